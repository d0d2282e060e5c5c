"""The CLI's two consoles and how an error reaches the user: one red line, no traceback."""

from __future__ import annotations

from rich.console import Console

from cpcli.errors import CpError, RecipeError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)


def print_error(err: CpError) -> None:
    """One red line per problem on stderr; a RecipeError lists every problem it found."""
    if isinstance(err, RecipeError) and len(err.problems) > 1:
        err_console.print(f"[red]error:[/red] {err.message}", markup=True)
        for problem in err.problems:
            err_console.print(f"  {problem}", markup=False)
        if err.hint:
            err_console.print(f"  hint: {err.hint}", markup=False)
        return
    text = err.problems[0] if isinstance(err, RecipeError) else err.message
    hint = f"; {err.hint}" if err.hint else ""
    err_console.print("[red]error:[/red] ", end="", markup=True)
    err_console.print(f"{text}{hint}", markup=False)
