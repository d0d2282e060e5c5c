"""`cp mark LABEL`: a timestamped event in the running session (a stimulus onset, a task started)."""

from __future__ import annotations

import json

import typer

from cpcli.cli.cluster import timing_from_env, token_option
from cpcli.cli.output import out_console
from cpcli.cluster.client import send_mark
from cpcli.cluster.locate import locate
from cpcli.errors import CpError
from cpcli.runtime import marks


def _meta(pairs: list[str]) -> dict[str, object]:
    """`k=v` pairs; numbers become numbers, everything else stays text."""
    meta: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise CpError(f"--meta {pair!r} is not KEY=VALUE", hint="write it like --meta trial=3 --meta cond=loud")
        value: object = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        meta[key.strip()] = value
    return meta


def mark_command(
    label: str = typer.Argument(..., metavar="LABEL", help="What happened, e.g. stimulus_on."),
    meta: list[str] = typer.Option([], "--meta", help="KEY=VALUE to keep with the mark; repeatable."),
    manager: str = typer.Option(None, "--manager", help="HOST:PORT of the manager (default: find it)."),
    interface: str = typer.Option(None, "--interface", help="IPv4 address to search for the manager on."),
    cluster: str = typer.Option(None, "--cluster", help="The cluster, when several managers answer."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON, for scripts."),
    token: str = token_option(),
) -> int:
    """Put LABEL into the running session's events.jsonl at the time of the call."""
    if not label.strip():
        raise CpError("the mark's LABEL is empty", hint="give it a word, e.g. cp mark stimulus_on")
    fields = _meta(meta)
    timing = timing_from_env()
    ref = locate(manager, interface, cluster, min(timing.discovery_s, 1.5), required=False)
    if ref is not None:
        done = send_mark(ref.address, label, fields, timing, ref.credentials(token))
        session, t_ns = str(done["session"]), int(done["t_ns"])
    else:
        here = marks.running()
        if not here:
            raise CpError("no session is recording on this machine, and no manager was found",
                          hint="start one with cp run; for a cluster pass --manager HOST:PORT or --interface IP")
        if len(here) > 1:
            listed = ", ".join(s["session"] for s in here)
            raise CpError(f"{len(here)} sessions are recording on this machine: {listed}",
                          hint="run one session at a time to mark it")
        session, t_ns = str(here[0]["session"]), marks.mark_here(here[0], label, fields)
    if as_json:
        out_console.print_json(json.dumps({"session": session, "label": label, "t_ns": t_ns, "meta": fields}))
    else:
        out_console.print(f"marked {label} at {t_ns / 1e9:.3f} s in session {session}", markup=False)
    return 0
