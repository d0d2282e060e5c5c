"""Modules imported on first use, so that loading the node types (`cp worker`, `cp devices`) skips numpy.

A node module writes `from cpcli.lazy import numpy as np` and uses `np.zeros(...)` as before.
Importing numpy costs ~0.1 CPU s, and `cp worker` imports every node module only to read its
parameters and devices; the node processes import numpy anyway (the transport needs it).

How: `numpy` here is a plain module object whose module-level `__getattr__` (PEP 562) is
called only for names it lacks. The first such name imports the real module and copies its
namespace in, so from then on `np.zeros` is an ordinary module attribute lookup, as fast as on
numpy itself. Names the real module gains later (submodules imported afterwards, numpy's own
lazy attributes) still miss and are fetched from it, then kept. Any read imports, dunders too
(`repr(np)` reads `__file__`): a node module touches `np` only inside functions. Type checkers never see the
proxy: under TYPE_CHECKING the name is the real module, so mypy checks `np.` calls as usual.
Annotation-only imports (`numpy.typing`) belong under TYPE_CHECKING in the node module.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

__all__ = ["lazy_module", "numpy"]


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module `name` that imports it when one of its attributes is first read."""
    proxy = types.ModuleType(name)

    def load(attr: str) -> Any:
        real = importlib.import_module(name)  # thread-safe (the import lock); cheap once imported
        if vars(proxy)["__spec__"] is None:  # the first miss: copy the real namespace in, keeping our hook
            vars(proxy).update((k, v) for k, v in vars(real).items() if k != "__getattr__")
        value = getattr(real, attr)  # AttributeError as the real module says it
        vars(proxy)[attr] = value  # a name numpy gained later: looked up here once, then plainly
        return value

    vars(proxy)["__getattr__"] = load
    return proxy


if TYPE_CHECKING:
    import numpy as numpy  # the real module's types; `as` marks the re-export for mypy --strict
else:
    numpy = lazy_module("numpy")  # a cache of an import, not state: the same numpy in every process
