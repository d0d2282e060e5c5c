"""Nothing that reaches a machine over the network can become code: no pickle, dill, eval, exec anywhere.

The package is read as syntax trees (comments and docstrings cannot trip or hide anything), every
module, since any of them may handle data that came from another machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cpcli._nodecheck import param_problems
from cpcli.registry import Registry
from cpcli.runtime.plan import plan_from_dict

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [ROOT / "cpcli", ROOT / "nodes"]
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in package.rglob("*.py"))


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{where}: calls {func.id}()")
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if func.value.id == "yaml" and func.attr in UNSAFE_YAML:
                    found.append(f"{where}: yaml.{func.attr}() can build Python objects; use yaml.safe_load")
                if func.attr == "load" and func.value.id in ("np", "numpy") and any(
                        k.arg == "allow_pickle" for k in node.keywords):
                    found.append(f"{where}: numpy load with allow_pickle")
    return found


def test_the_scan_sees_what_it_forbids(tmp_path: Path) -> None:
    """The scan itself works: a module with each forbidden thing is caught (a test that cannot fail is none)."""
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nfrom dill import loads\nimport yaml\nimport numpy as np\n"
                   "x = eval('1')\nexec('y = 2')\nyaml.load('a', Loader=None)\nnp.load('f', allow_pickle=True)\n")
    found = _problems(bad)
    assert len(found) == 6, found


def test_no_module_can_turn_network_data_into_code() -> None:
    sources = _sources()
    assert len(sources) > 40, "the scan must read the whole package"
    problems = [p for path in sources for p in _problems(path)]
    assert not problems, "\n".join(problems)


def test_a_worker_takes_the_code_it_runs_from_its_own_registry(registry: Registry) -> None:
    """A plan from the network names a node type; what runs is the entry point installed here, whatever it sent."""
    sent = {"id": "cam", "type": "test_video", "entry_point": "os:system", "params": {}, "record": False,
            "sync": "latest", "tolerance_ms": 0.0, "inputs": [], "outputs": ["frame"]}
    installed = registry.types["test_video"].origin
    plan = plan_from_dict(sent, installed)
    assert plan.entry_point == installed != "os:system"


@pytest.mark.parametrize(("params", "expected"), [
    ({"width": "640; rm -rf /"}, "must be"),
    ({"__class__": 1}, "unknown param"),
    ({"width": {"nested": [1, 2]}}, "must be"),
])
def test_params_from_the_network_are_checked_against_the_signature(registry: Registry, params: dict[str, object],
                                                                   expected: str) -> None:
    problems = param_problems(registry.types["test_video"], params)
    assert problems and expected in problems[0], problems
    assert param_problems(registry.types["test_video"], {"width": 64, "height": 48}) == []
