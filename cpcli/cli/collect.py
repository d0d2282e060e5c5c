"""`cp collect`: the session's parts from every machine into one verified folder; exit 1 if incomplete."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cpcli.cli.cluster import timing_from_env, token_option
from cpcli.cli.output import err_console, out_console
from cpcli.cluster.collect import MANAGER, Collector, CollectResult, DeletePlan
from cpcli.cluster.locate import locate
from cpcli.errors import CpError


def collect_command(
    session: str = typer.Argument(None, metavar="[SESSION]", help="The session to collect (default: the latest)."),
    out: Path = typer.Option(Path("collected"), "--out", help="Folder to collect into (as DIR/<session>/)."),
    only: list[str] = typer.Option([], "--from", help="Collect only this worker's part; repeatable."),
    listing: bool = typer.Option(False, "--list", help="List the sessions the cluster knows, and stop."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON, for scripts."),
    delete_remote: bool = typer.Option(False, "--delete-remote", help="Then delete each worker's copy of its part, "
                                       "once every file of that part is verified here (asks first)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete with --delete-remote without asking."),
    manager: str = typer.Option(None, "--manager", help="HOST:PORT of the manager (default: find it)."),
    interface: str = typer.Option(None, "--interface", help="IPv4 address to search for the manager on."),
    cluster: str = typer.Option(None, "--cluster", help="The cluster, when several managers answer."),
    token: str = token_option(),
) -> int:
    """Gather a session from every worker into DIR/<session>/, checking every file's sha256; resumable."""
    if delete_remote and listing:
        raise typer.BadParameter("--delete-remote does not go with --list", param_hint="--delete-remote")
    if delete_remote and not yes and not sys.stdin.isatty():  # before anything moves, let alone goes
        raise CpError("--delete-remote asks before deleting the workers' copies, and there is no terminal to ask on",
                      hint="pass --yes to delete each verified part without asking")
    timing = timing_from_env()
    ref = locate(manager, interface, cluster, timing.discovery_s, required=True)
    assert ref is not None
    credentials = ref.credentials(token)
    with _Bars(enabled=not as_json) as bars, Collector(ref.address, out, timing, only, bars.update,
                                                       credentials) as collector:
        if listing:
            sessions = collector.sessions()
            if as_json:
                out_console.print_json(json.dumps(sessions))
            else:
                out_console.print(_sessions_table(sessions))
            return 0
        result = collector.collect(session, delete_remote, None if yes else bars.ask)
    if as_json:
        out_console.print_json(json.dumps(_result_dict(result)))
        return 0 if result.complete and not result.undeleted else 1
    done = sum(len(p.verified) for p in result.parts.values())
    moved = result.transferred_bytes
    rate = f", {moved / max(result.transfer_s, 1e-6) / 1e6:.0f} MB/s" if moved else ""
    out_console.print(f"session {result.session}: {done} files verified in {result.folder} "
                      f"({moved / 1e6:.1f} MB transferred in {result.transfer_s:.1f} s{rate})",
                      markup=False)
    for part in result.parts.values():
        if part.gone or delete_remote and part.owner != MANAGER:
            out_console.print(part.remote_summary(), markup=False)
    if not result.complete:
        lines = [p.summary() for p in result.parts.values() if p.status != "complete"]
        raise CpError("; ".join(lines), hint=f"run `cp collect {result.session}` again when it is back")
    if result.undeleted:
        raise CpError("; ".join(p.remote_summary() for p in result.undeleted),
                      hint=f"run `cp collect {result.session} --delete-remote` again")
    return 0


def _result_dict(result: CollectResult) -> dict[str, object]:
    return {"session": result.session, "folder": str(result.folder), "complete": result.complete,
            "transferred_bytes": result.transferred_bytes, "transfer_s": round(result.transfer_s, 4),
            "parts": {name: p.to_dict() for name, p in result.parts.items()}}


def _sessions_table(sessions: list[dict[str, object]]) -> Table:
    table = Table("session", "started (UTC)", "workers", "status", "size", "collected", box=None)
    for s in sessions:
        workers = s.get("workers")
        table.add_row(str(s["name"]), str(s.get("start_utc") or "-"),
                      ", ".join(str(w) for w in workers) if isinstance(workers, list) else "-",
                      str(s.get("status")), f"{int(str(s.get('bytes') or 0)) / 1e6:.1f} MB",
                      "yes" if s.get("collected") else "no")
    return table


class _Bars:
    """Rich progress bars on stderr: one per machine and one overall (nothing with --json)."""

    def __init__(self, enabled: bool) -> None:
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                                  disable=not enabled, transient=False)
        self._tasks: dict[str, TaskID] = {}
        self._done: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._overall = self._progress.add_task("all", total=0)

    def ask(self, plan: DeletePlan) -> bool:
        """--delete-remote's question, on the terminal; asked before any bar is drawn."""
        size = f"{plan.bytes / 1e9:.1f} GB" if plan.bytes >= 1e8 else f"{plan.bytes / 1e6:.1f} MB"
        return typer.confirm(f"Delete {plan.files} files ({size}) of session {plan.session} from workers "
                             f"{', '.join(plan.workers)} after verifying them here?", default=False, err=True)

    def update(self, part: str, done: int, total: int) -> None:
        self._progress.start()  # at the first bytes, after the question: a no-op once started (under a lock)
        if part not in self._tasks:
            self._tasks[part] = self._progress.add_task(part, total=total)
        self._done[part], self._totals[part] = done, total
        self._progress.update(self._tasks[part], completed=done, total=total)
        self._progress.update(self._overall, completed=sum(self._done.values()), total=sum(self._totals.values()))

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._progress.stop()
