"""Every recipe shipped in recipes/ loads, validates and runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpcli.recipe import load_recipe
from cpcli.registry import Registry
from cpcli.runtime.session import RunOptions, StopControl, run_session
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
HARDWARE_MARK = "# needs a "  # recipes for real laptops say so in a comment: "# needs a camera"


def needs_hardware(path: Path) -> bool:
    return any(line.startswith(HARDWARE_MARK) for line in path.read_text().splitlines())


def test_the_demo_recipe_is_shipped() -> None:
    assert ROOT / "recipes" / "demo.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path: Path, registry: Registry) -> None:
    recipe = load_recipe(path, registry)
    assert recipe.nodes


SOFTWARE_ONLY = [p for p in RECIPES if not needs_hardware(p)]


@pytest.mark.parametrize("path", SOFTWARE_ONLY, ids=[p.name for p in SOFTWARE_ONLY])
def test_shipped_recipe_runs_without_hardware(path: Path, registry: Registry, tmp_path: Path) -> None:
    recipe = load_recipe(path, registry)
    result = run_session(recipe, registry, RunOptions(out_dir=tmp_path, duration_s=1.0), StopControl())
    assert not result.failures
    assert all(node["stats"]["samples_out"] > 0 for node in result.manifest["nodes"].values()
               if node["type"] != "discard")
