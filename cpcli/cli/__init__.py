"""The `cp` entry point: hands file copies to coreutils, runs cpcli commands behind one error boundary."""

from __future__ import annotations

import os
import sys
import traceback

# Our subcommands, with how many positional arguments each takes: anything else goes to coreutils.
SUBCOMMANDS = {"run": 1, "validate": 1, "nodes": 0, "inspect": 1, "devices": 0, "manager": 0, "worker": 0,
               "status": 0, "mark": 1, "monitor": 0, "collect": 1, "token": 0}
RECIPE_COMMANDS = frozenset({"run", "validate"})  # their positional argument is a .yaml recipe
SESSION_COMMANDS = frozenset({"inspect"})  # their positional argument is a session folder
SESSION_FILE_ENDINGS = (".csv", ".jsonl", ".mp4", ".wav", "node.json")  # what <worker>/<node>/ of a session holds
TOP_OPTIONS = frozenset({"--help", "-h", "--version", "--install-completion", "--show-completion"})
SYSTEM_CP = ("/usr/bin/cp", "/bin/cp")  # where coreutils (or BSD) cp lives on Linux and macOS
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def is_ours(args: list[str]) -> bool:
    """Whether `cp ARGS` is a cpcli command rather than a file copy.

    A subcommand name is ours unless a file of that name is here and the arguments after it
    do not fit the command (`cp run backup/` copies a file named `run`; `cp run demo.yaml`
    still runs a recipe; `cp inspect SESSION_DIR` inspects when SESSION_DIR is a session folder).
    """
    if not args:
        return True
    first = args[0]
    if first in TOP_OPTIONS:
        return True
    if first not in SUBCOMMANDS:
        return False
    if not os.path.lexists(first):
        return True
    positionals = [a for a in args[1:] if not a.startswith("-")]
    if len(positionals) > SUBCOMMANDS[first]:
        return False
    if first in RECIPE_COMMANDS:
        return all(p.endswith((".yaml", ".yml")) for p in positionals)
    if first in SESSION_COMMANDS:
        return all(looks_like_session(p) for p in positionals)
    return True


def looks_like_session(path: str) -> bool:
    """A session folder: it has manifest.json, or `<worker>/<node>/` with recorded files (a killed `cp run`)."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return True
    try:
        with os.scandir(path) as workers:
            for worker in workers:
                if not worker.is_dir() or worker.name.startswith("."):
                    continue
                with os.scandir(worker.path) as nodes:
                    for node in nodes:
                        if node.is_dir():
                            with os.scandir(node.path) as files:
                                if any(f.name.endswith(SESSION_FILE_ENDINGS) for f in files):
                                    return True
    except OSError:
        return False
    return False


def find_system_cp() -> str | None:
    """The system's real `cp`: a binary, never this script or a shim that leads back to it."""
    own = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    candidates = list(SYSTEM_CP)
    candidates += [os.path.join(d, "cp") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for path in candidates:
        if not os.access(path, os.X_OK) or os.path.isdir(path) or os.path.realpath(path) == own:
            continue
        try:
            with open(path, "rb") as fh:
                if fh.read(2) == b"#!":  # a script (our entry point, a pyenv shim): not coreutils
                    continue
        except OSError:
            continue
        return path
    return None


def pass_to_system_cp(args: list[str]) -> None:
    path = find_system_cp()
    if path is None:
        sys.stderr.write(
            "cp: the system's cp command was not found; cpcli only handles its own subcommands\n"
        )
        sys.exit(127)
    os.execv(path, ["cp", *args])


def main(argv: list[str] | None = None) -> None:
    """`cp`: coreutils for copies; cpcli commands with exit codes 0, 1 (CpError), 2, 130."""
    args = sys.argv[1:] if argv is None else argv
    if not is_ours(args):
        pass_to_system_cp(args)
    sys.exit(run_cli(args))


def run_cli(args: list[str]) -> int:
    import typer  # imported here: a file copy must not pay for the CLI's imports

    from cpcli.cli.app import app
    from cpcli.cli.output import print_error
    from cpcli.errors import CpError

    try:
        result = app(args=args, prog_name="cp", standalone_mode=False)
    except CpError as err:
        print_error(err)
        return EXIT_ERROR
    except typer.Exit as exit_:
        return int(exit_.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:
        show = getattr(err, "show", None)
        if callable(show) and isinstance(getattr(err, "exit_code", None), int):  # click's usage errors
            show()
            return EXIT_USAGE
        traceback.print_exc()  # a bug: show everything so it can be reported
        sys.stderr.write("this is a bug in cpcli; please report it with the traceback above\n")
        return EXIT_USAGE
    return int(result) if isinstance(result, int) else EXIT_OK
