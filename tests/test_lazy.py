"""cpcli.lazy: a module stand-in imports the real module on first use and then reads like it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpcli.lazy import lazy_module

NAME = "cpcli_lazy_target"


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module nobody has imported yet, forgotten again afterwards."""
    (tmp_path / f"{NAME}.py").write_text("VALUE = [1]\n\ndef double(x):\n    return 2 * x\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop(NAME, None)


def test_the_module_is_imported_at_the_first_attribute_read_and_then_read_directly(target: Path) -> None:
    proxy = lazy_module(NAME)
    assert NAME not in sys.modules
    assert proxy.double(3) == 6
    real = sys.modules[NAME]
    assert proxy.VALUE is real.VALUE
    assert vars(proxy)["VALUE"] is real.VALUE  # copied in: later reads are plain module lookups
    assert proxy.__file__ == real.__file__


def test_a_missing_name_is_an_attribute_error_and_a_name_added_later_is_found(target: Path) -> None:
    proxy = lazy_module(NAME)
    assert not hasattr(proxy, "nothing_here")
    real = sys.modules[NAME]
    vars(real)["added_later"] = "late"  # as a submodule imported later appears on its package
    assert proxy.added_later == "late"


def test_a_module_that_does_not_exist_fails_at_first_use_not_before(target: Path) -> None:
    proxy = lazy_module("cpcli_lazy_no_such_module")
    with pytest.raises(ModuleNotFoundError):
        proxy.anything  # noqa: B018
