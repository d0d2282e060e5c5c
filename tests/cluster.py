"""A cluster in the namespace lab: `cp manager` and `cp worker` as real processes on lab hosts.

`ClusterLab(lab, tmp_path)` starts them with `python -m cpcli` inside the hosts' namespaces (each in
its own process group, stopped by the lab's teardown whatever happens), with their output in files
under `tmp_path/logs/`, and every machine's `--data` folder under `tmp_path/<name>-data/`.

The hosts share one config folder (`tmp_path/config`), as if every machine held the cluster's keys:
tests of joining with a token, and of strangers, give a host a folder of its own (`own_config`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.lab import Lab

PORT = 7425
START_TIMEOUT_S = 15.0  # interpreter start, imports, mDNS probing (1.5 s), first registration


class Proc:
    """A process of the lab whose output (stdout and stderr) goes to one file."""

    def __init__(self, popen: subprocess.Popen[Any], log: Path, name: str) -> None:
        self.popen, self.log, self.name = popen, log, name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str, timeout_s: float, after: int = 0) -> float:
        """Wait until `needle` appears in the output (past character `after`); returns when it did (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # bounded by timeout_s
            if needle in self.text()[after:]:
                return time.monotonic()
            if self.popen.poll() is not None and needle not in self.text()[after:]:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before {needle!r}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {needle!r} within {timeout_s:g} s:\n{self.text()}")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout_s:g} s:\n{self.text()}") from None


class ClusterLab:
    def __init__(self, lab: Lab, tmp: Path, timing: dict[str, float] | None = None) -> None:
        self.lab, self.tmp = lab, tmp
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", XDG_CONFIG_HOME=str(tmp / "config"))
        self.env.pop("CP_INTERFACE", None)
        self.env.pop("CP_TOKEN", None)
        if timing:
            self.env["CP_CLUSTER_TIMING"] = json.dumps(timing)
        (tmp / "logs").mkdir(exist_ok=True)
        self._count = 0

    def data(self, name: str) -> Path:
        return self.tmp / f"{name}-data"

    def own_config(self, name: str, **extra: str) -> dict[str, str]:
        """An environment whose config folder (keys, tokens) is `tmp/config-<name>`: a machine of its own."""
        folder = self.tmp / f"config-{name}"
        folder.mkdir(exist_ok=True)
        return dict(self.env, XDG_CONFIG_HOME=str(folder), **extra)

    def make_keys(self, cluster: str = "default") -> None:
        """The keys of a cluster whose manager has not started yet (the lab's machines all hold them)."""
        done = subprocess.run([sys.executable, "-c", "import sys; from cpcli.cluster import keys; "
                               "keys.manager_keys(sys.argv[1], create=True)", cluster], capture_output=True,
                              text=True, env=self.env, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr

    def token(self, cluster: str = "default") -> str:
        """The join token of a cluster whose manager ran here (from the shared config folder)."""
        done = subprocess.run([sys.executable, "-m", "cpcli", "token", "--cluster", cluster], capture_output=True,
                              text=True, env=self.env, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def start(self, host: int, args: list[str], name: str, wrap: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> Proc:
        """Start `cp ARGS` on a host (`wrap`: a command it runs under, e.g. `unshare --time ...`)."""
        self._count += 1
        log = self.tmp / "logs" / f"{self._count:02d}-{name}.log"
        with open(log, "wb") as out:
            popen = self.lab.run(host, [*wrap, sys.executable, "-m", "cpcli", *args], stdout=out,
                                 stderr=subprocess.STDOUT, env=env or self.env, cwd=self.tmp)
        return Proc(popen, log, name)

    def manager(self, host: int, name: str = "m1", *extra: str, port: int = PORT, wait: bool = True) -> Proc:
        proc = self.start(host, ["manager", "--name", name, "--interface", self.lab.ip(host), "--port", str(port),
                                 "--data", str(self.data(name)), *extra], f"manager-{name}")
        if wait:
            proc.wait_for("listening on", START_TIMEOUT_S)
        return proc

    def worker(self, host: int, name: str, *extra: str, wait: bool = True, skew_s: float = 0.0,
               env: dict[str, str] | None = None) -> Proc:
        """`cp worker` on a host; `skew_s` runs it in a time namespace whose monotonic clock is that far ahead."""
        wrap = ("unshare", "--time", "--monotonic", str(skew_s)) if skew_s else ()
        proc = self.start(host, ["worker", "--name", name, "--interface", self.lab.ip(host),
                                 "--data", str(self.data(name)), *extra], f"worker-{name}", wrap, env)
        if wait:
            proc.wait_for("joined manager", START_TIMEOUT_S)
        return proc

    def cp(self, host: int, *args: str, timeout_s: float = 60.0,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a `cp` command on a host to its end, with its output."""
        proc = self.lab.run(host, [sys.executable, "-m", "cpcli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or self.env, cwd=self.tmp)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=5)
            raise AssertionError(f"cp {' '.join(args)} did not end within {timeout_s:g} s:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def status(self, host: int, address: str, cluster: str | None = None) -> dict[str, Any]:
        """`cp status --json` of a manager (`cluster`: needed where keys of several clusters are held)."""
        done = self.cp(host, "status", "--json", "--manager", address, *(("--cluster", cluster) if cluster else ()),
                       timeout_s=20)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def recipe(self, text: str, name: str = "recipe.yaml") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path
