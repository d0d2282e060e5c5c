"""One session across workers as the manager follows it, and the manifest made of what its workers reported.

`ClusterSession` is the manager's state of a running session; `record()` is what `session.json`
keeps of it, so that a manager back after a crash follows it again (`from_record`).
`build_manifest` turns the workers' final reports into `manifest.json` (nodes, files, stats, each
worker's clock history, who was lost when, warnings).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpcli import __version__
from cpcli.archive.files import file_record
from cpcli.archive.manifest import read_node_record
from cpcli.clock import CLOCK_WARN_NS
from cpcli.runtime.wiring import Bound

SESSION_RECORD = "session.json"  # the manager's record of a session while it runs
LOST = "lost"


@dataclass
class ClusterSession:
    """One session across workers, as the manager follows it."""

    name: str
    dir: Path
    recipe: str
    recipe_text: str
    nodes: list[dict[str, Any]]  # the plans, as plain data, each with its "worker"
    options: dict[str, Any]
    timing: dict[str, Any]
    on_worker_lost: str = "continue"
    phase: str = "preparing"  # preparing | wired | running | stopping | finished
    client: bytes | None = None
    client_heard: float = 0.0
    created: float = field(default_factory=time.monotonic)
    start_ns: int | None = None  # manager monotonic time of the start (the session timeline's 0)
    start_utc: str | None = None
    stop_ns: int | None = None
    stop_deadline: float = 0.0
    bound: dict[str, Bound] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # worker -> its final report
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> last status
    failures: dict[str, str] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)  # worker -> session time it was lost (ns)
    rejoined: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    interrupted: bool = False
    next_progress: float = 0.0
    client_token: str = field(default_factory=lambda: secrets.token_hex(16))  # only its cp run may reattach

    @property
    def workers(self) -> list[str]:
        return sorted({str(n["worker"]) for n in self.nodes})

    def on(self, worker: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes if n["worker"] == worker]

    def t_ns(self) -> int:
        return 0 if self.start_ns is None else time.monotonic_ns() - self.start_ns

    def record(self) -> dict[str, Any]:
        """What a restarted manager needs to follow the session again."""
        return {"session": self.name, "recipe": self.recipe, "nodes": self.nodes, "options": self.options,
                "timing": self.timing, "on_worker_lost": self.on_worker_lost, "phase": self.phase,
                "start_ns": self.start_ns, "start_utc": self.start_utc, "stop_ns": self.stop_ns,
                "lost": self.lost, "failures": self.failures, "error": self.error,
                "interrupted": self.interrupted, "client_token": self.client_token}

    def worker_of(self, node_id: str) -> str:
        return next(str(n["worker"]) for n in self.nodes if n["id"] == node_id)

    @classmethod
    def from_record(cls, folder: Path, data: dict[str, Any], reattach_s: float) -> ClusterSession:
        """The session a `session.json` (`record()`) describes, for a manager back after a crash; its
        client has `reattach_s` to come back."""
        return cls(
            name=folder.name, dir=folder, recipe=str(data.get("recipe", "")), recipe_text="",
            nodes=list(data.get("nodes") or []), options=dict(data.get("options") or {}),
            timing=dict(data.get("timing") or {}), on_worker_lost=str(data.get("on_worker_lost", "continue")),
            phase=str(data["phase"]), client=b"", client_heard=time.monotonic() + reattach_s,
            start_ns=data.get("start_ns"), start_utc=data.get("start_utc"), stop_ns=data.get("stop_ns"),
            lost={str(k): int(v) for k, v in dict(data.get("lost") or {}).items()},
            failures=dict(data.get("failures") or {}), error=data.get("error"),
            interrupted=bool(data.get("interrupted")), client_token=str(data.get("client_token") or ""))


def build_manifest(session: ClusterSession, hosts: dict[str, str], lost: set[str],
                   manager: dict[str, Any]) -> dict[str, Any]:
    """The session's manifest from what its workers reported; `hosts`: each known worker's address, `lost`:
    the workers lost now, `manager`: the manager's name, cluster and host."""
    started = session.start_ns is not None
    end = session.stop_ns or time.monotonic_ns()
    duration_ns = max(0, end - session.start_ns) if session.start_ns is not None else 0
    workers: dict[str, Any] = {}
    for name in session.workers:
        report = session.finished.get(name, {})
        history = [row for row in report.get("clock") or [] if isinstance(row, list) and len(row) == 4]
        workers[name] = {"host": hosts.get(name), "clock": _clock_record(history),
                         "finished": name in session.finished,
                         "files": list(report.get("files") or [])}
        if name in session.lost:
            workers[name]["lost_at_ns"] = session.lost[name]
            if name in session.rejoined:
                workers[name]["rejoined_at_ns"] = session.rejoined[name]
    nodes: dict[str, Any] = {}
    for node in session.nodes:
        status = session.statuses.get(node["id"], {})
        files, stats = list(status.get("files") or []), dict(status.get("stats") or {})
        if node["record"] and not files:  # a node whose worker did not report: trust its own record
            own = read_node_record(session.dir, node["worker"], node["id"])
            if own is not None:
                files, stats = list(own.get("files", [])), own.get("stats", stats)
        state = status.get("state", "starting")
        if node["worker"] in lost and node["worker"] not in session.finished:
            state = LOST
        record = {"type": node["type"], "worker": node["worker"], "params": node["params"],
                  "record": node["record"], "inputs": [i[0] for i in node["inputs"]], "stats": stats,
                  "files": files, "state": state, "info": dict(status.get("info") or {})}
        if status.get("error"):
            record["error"] = status["error"]
        gone = {i[1]: session.lost[w] for i in node["inputs"]
                if (w := session.worker_of(i[1])) in session.lost and w not in session.finished}
        if gone:  # fed by a machine that was lost: what it received stops there
            record["inputs_lost"] = {source: {"worker": session.worker_of(source), "lost_at_ns": t}
                                     for source, t in gone.items()}
        nodes[node["id"]] = record
    failed = session.failures or session.error or any(n["state"] == "failed" for n in nodes.values())
    unfinished = [w for w in session.workers if w not in session.finished]
    outcome = "failed" if failed else "incomplete" if unfinished or not started else "complete"
    manifest: dict[str, Any] = {
        "session": session.name, "recipe": session.recipe, "start_utc": session.start_utc,
        "duration_ns": duration_ns, "cpcli_version": __version__, "status": outcome,
        "clock": {"start_cluster_ns": session.start_ns, "source": manager["name"]},
        "manager": manager,
        "workers": workers, "nodes": nodes, "files": [],
    }
    if session.error:
        manifest["error"] = session.error
    warnings = clock_warnings(workers)
    if warnings:
        manifest["warnings"] = warnings
    if session.lost:
        manifest["lost_workers"] = {w: {"lost_at_ns": t, "rejoined_at_ns": session.rejoined.get(w),
                                        "finished": w in session.finished} for w, t in session.lost.items()}
    recipe = session.dir / "recipe.yaml"
    if recipe.exists():
        manifest["files"].append(file_record(recipe, "recipe.yaml", "recipe").__dict__)
    for report in session.finished.values():
        manifest["files"].extend(report.get("files") or [])
    return manifest


def _clock_record(history: list[list[Any]]) -> dict[str, Any]:
    """The manifest's clock of one worker: the last estimate, the worst uncertainty, and the history."""
    if not history:
        return {"offset_ns": None, "drift_ppm": None, "uncertainty_ns": None, "measured": False, "history": []}
    last = history[-1]
    worst = max(int(row[3]) for row in history)
    return {"offset_ns": int(last[1]), "drift_ppm": round(float(last[2]) / 1e3, 3), "uncertainty_ns": int(last[3]),
            "max_uncertainty_ns": worst, "measured": True,
            "history_columns": ["t_ns", "offset_ns", "drift_ppb", "uncertainty_ns"], "history": history}


def clock_warnings(workers: dict[str, Any], threshold_ns: int = CLOCK_WARN_NS) -> list[str]:
    """What the summary says about the manifest's worker clocks: too uncertain, or never aligned."""
    warnings = []
    for name, worker in workers.items():
        clock = worker.get("clock") or {}
        if clock.get("measured") and int(clock.get("max_uncertainty_ns") or 0) > threshold_ns:
            warnings.append(f"worker {name}: clock uncertainty reached {clock['max_uncertainty_ns'] / 1e6:.2f} ms "
                            f"(above {threshold_ns / 1e6:g} ms): its timestamps may be off by that much")
        elif not clock.get("measured") and worker.get("finished"):
            warnings.append(f"worker {name}: its clock was never aligned to the manager's")
    return warnings
