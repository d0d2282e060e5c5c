"""The `cp` entry point: its own commands, and every other invocation handed to coreutils."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpcli import __version__
from cpcli.cli import SUBCOMMANDS, is_ours
from cpcli.cli.app import COMMANDS, app
from tests.conftest import ROOT, cp, write_recipe

runner = CliRunner()


def test_help_lists_every_registered_command_and_nothing_more() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output
    assert set(COMMANDS) == set(SUBCOMMANDS), "the passthrough table must know every command"
    for name in COMMANDS:  # each one loads (its module and function exist)
        assert runner.invoke(app, [name, "--help"]).exit_code == 0, name


def test_version() -> None:
    result = cp("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cpcli {__version__}"


def test_copy_of_two_files_goes_to_coreutils(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    result = cp("a.txt", "b.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.txt").read_text() == "hello"


def test_recursive_copy_goes_to_coreutils(tmp_path: Path) -> None:
    (tmp_path / "src" / "deep").mkdir(parents=True)
    (tmp_path / "src" / "deep" / "f").write_text("x")
    result = cp("-r", "src", "dst", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dst" / "deep" / "f").read_text() == "x"


def test_long_options_of_coreutils_pass_through(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    result = cp("--preserve=all", "a", "b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b").read_text() == "x"


def test_coreutils_exit_code_and_message_are_kept(tmp_path: Path) -> None:
    result = cp("missing.txt", "b.txt", cwd=tmp_path)
    assert result.returncode == 1
    assert "missing.txt" in result.stderr and "No such file" in result.stderr


def test_a_file_named_like_a_subcommand_is_still_copied(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("script")
    (tmp_path / "backup").mkdir()
    result = cp("run", "backup/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "backup" / "run").read_text() == "script"


@pytest.mark.parametrize(("args", "ours"), [
    ([], True), (["--help"], True), (["--version"], True), (["run", "r.yaml"], True), (["nodes"], True),
    (["a", "b"], False), (["-r", "a", "b"], False), (["--preserve=all", "a", "b"], False), (["-v"], False),
])
def test_which_invocations_are_ours(args: list[str], ours: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_ours(args) is ours


def test_validate_prints_a_summary_for_a_good_recipe() -> None:
    result = runner.invoke(app, ["validate", str(ROOT / "recipes" / "demo.yaml")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output and "5 nodes (2 sources)" in result.output


def test_validate_lists_every_problem_with_exit_1(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: bad
nodes:
  cam: {type: test_video, params: {width: -3}}
  gray: {type: grayscale, inputs: [cma]}
  Bad Id: {type: motion, inputs: [gray]}
""")
    result = cp("validate", str(recipe))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert "3 problem" in lines[0] or "problem" in lines[0]
    assert any("recipe.yaml:4" in line and "width" in line for line in lines)
    assert any("recipe.yaml:5" in line and "cma" in line and "cam" in line for line in lines)
    assert any("recipe.yaml:6" in line and "Bad Id" in line for line in lines)


def test_validate_json_for_scripts(tmp_path: Path) -> None:
    good = cp("validate", str(ROOT / "recipes" / "demo.yaml"), "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["valid"] is True
    recipe = write_recipe(tmp_path, "name: x\nnodes: {a: {type: nope}}\n")
    bad = cp("validate", str(recipe), "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["valid"] is False


def test_nodes_lists_builtin_and_plugin_types_with_params() -> None:
    result = cp("nodes", "--json")
    assert result.returncode == 0, result.stderr
    types = json.loads(result.stdout)["types"]
    for name in ("test_video", "test_audio", "grayscale", "resize", "motion", "audio_level", "counter"):
        assert name in types
    params = {p["name"]: p for p in types["test_video"]["params"]}
    assert params["width"] == {"name": "width", "type": "int", "required": False, "default": 640}
    assert types["test_video"]["outputs"] == ["video"]
    table = cp("nodes")
    assert table.returncode == 0 and "test_audio" in table.stdout


def test_usage_error_exits_2() -> None:
    result = cp("run")
    assert result.returncode == 2
    assert "RECIPE" in result.stderr
