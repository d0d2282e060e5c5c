"""Cluster keys and join tokens on disk, and `cp token` / `cp worker --token` / `--insecure` from the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cpcli.cluster import keys
from cpcli.errors import CpError
from tests.conftest import cp
from tests.lab import read_line


@pytest.fixture()
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh config folder, for this process and for the `cp` it runs."""
    folder = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    return dict(os.environ, XDG_CONFIG_HOME=str(folder))


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    stderr = result.stderr
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_keys_are_private_and_a_token_carries_them(config: dict[str, str]) -> None:
    creds = keys.manager_keys("lab-a", create=True)
    assert creds is not None
    path = keys.cluster_dir("lab-a") / keys.MANAGER_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert keys.manager_keys("lab-a", create=True) == creds  # made once, then read
    parsed = keys.parse_token(keys.encode_token(creds))
    assert (parsed.cluster, parsed.manager_public, parsed.secret) == ("lab-a", creds.manager_public, creds.secret)
    assert parsed.member_public == creds.member_public and parsed.manager_secret is None
    saved = keys.save_token(parsed)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert keys.stored_token("lab-a") == parsed


def test_rotation_keeps_the_manager_key_and_changes_the_secret(config: dict[str, str]) -> None:
    old = keys.manager_keys("lab-a", create=True)
    assert old is not None
    new = keys.rotate("lab-a")
    assert new.manager_public == old.manager_public and new.secret != old.secret
    assert new.member_public != old.member_public  # old members' key no longer opens anything
    assert keys.manager_keys("lab-a", create=False) == new
    with pytest.raises(CpError, match="no keys of cluster lab-b"):
        keys.rotate("lab-b")


@pytest.mark.parametrize(("token", "expected"), [
    ("", "not a cpcli join token"),
    ("hello", "not a cpcli join token"),
    ("cp1:lab-a", "not a cpcli join token"),
    ("cp1:../etc:AAAA", "is not a cluster name"),
    ("cp1:lab-a:%%%%", "damaged"),
    ("cp1:lab-a:AAAA", "too short"),
])
def test_bad_tokens_get_one_clear_line(config: dict[str, str], token: str, expected: str) -> None:
    with pytest.raises(CpError, match=expected):
        keys.parse_token(token)
    line = _one_error_line(cp("token", "--save", token, env=config))
    assert expected in line and "cp token" in line


def test_a_mistyped_token_is_caught_by_its_check_digits(config: dict[str, str]) -> None:
    creds = keys.manager_keys("lab-a", create=True)
    assert creds is not None
    token = keys.encode_token(creds)
    body = token.rsplit(":", 1)[1]
    flipped = token[: -len(body)] + body[:10] + ("B" if body[10] == "A" else "A") + body[11:]
    with pytest.raises(CpError, match="check digits"):
        keys.parse_token(flipped)
    with pytest.raises(CpError, match="too long"):
        keys.parse_token(token + "AAAA")


def test_cp_token_shows_saves_and_rotates(config: dict[str, str], tmp_path: Path) -> None:
    assert "no cluster's manager keys" in _one_error_line(cp("token", env=config))
    keys.manager_keys("lab-a", create=True)
    shown = cp("token", env=config)
    assert shown.returncode == 0, shown.stderr
    token = shown.stdout.strip()
    assert token.startswith("cp1:lab-a:") and "\n" not in token  # stdout is the token alone: $(cp token) works
    assert json.loads(cp("token", "--json", env=config).stdout)["token"] == token

    assert "--yes" in _one_error_line(cp("token", "--rotate", env=config))  # no terminal to ask on
    assert cp("token", env=config).stdout.strip() == token
    rotated = cp("token", "--rotate", "--yes", env=config)
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.strip() != token and rotated.stdout.strip().startswith("cp1:lab-a:")

    member = dict(config, XDG_CONFIG_HOME=str(tmp_path / "member"))
    saved = cp("token", "--save", token, env=member)
    assert saved.returncode == 0 and "stored the join token of cluster lab-a" in saved.stderr
    assert (tmp_path / "member" / "cpcli" / "clusters" / "lab-a" / "token").read_text().strip() == token
    assert "not lab-b" in _one_error_line(cp("token", "--save", token, "--cluster", "lab-b", env=member))


def test_readable_key_files_are_refused(config: dict[str, str]) -> None:
    keys.manager_keys("lab-a", create=True)
    path = keys.cluster_dir("lab-a") / keys.MANAGER_FILE
    path.chmod(0o644)
    line = _one_error_line(cp("token", env=config))
    assert "can be read by other users" in line and f"chmod 600 {path}" in line


def test_a_worker_without_a_token_says_how_to_get_one(config: dict[str, str]) -> None:
    line = _one_error_line(cp("worker", "--manager", "127.0.0.1:9", env=config))
    assert "no join token" in line and "cp token" in line
    line = _one_error_line(cp("worker", "--token", "cp1:lab-a:AAAA", "--manager", "127.0.0.1:9", env=config))
    assert "--token" in line and "too short" in line


def test_insecure_is_for_one_machine_only(config: dict[str, str]) -> None:
    line = _one_error_line(cp("worker", "--insecure", "--manager", "198.18.0.1:7425", env=config))
    assert "only a demo manager on this machine" in line
    outside = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
               if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    if outside:
        line = _one_error_line(cp("manager", "--insecure", "--interface", outside[0], "--port", "0", env=config))
        assert "only for a demo on one machine" in line
    assert not (Path(config["XDG_CONFIG_HOME"]) / "cpcli").exists(), "a refused start must not make keys"


def test_an_insecure_demo_warns_each_time_and_needs_no_token(config: dict[str, str], tmp_path: Path) -> None:
    manager = subprocess.Popen([sys.executable, "-m", "cpcli", "manager", "--insecure", "--interface", "127.0.0.1",
                                "--port", "0", "--no-local-worker", "--data", str(tmp_path / "data")],
                               env=config, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    worker = None
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("listening on" in line for line in lines):  # bounded
            lines.append(read_line(manager, 20))
        said = "\n".join(lines)
        assert "WARNING: this manager runs --insecure" in said and "join token" not in said, said
        address = re.search(r"listening on (127\.0\.0\.1:\d+)", said)
        assert address is not None, said
        worker = subprocess.Popen([sys.executable, "-m", "cpcli", "worker", "--insecure", "--name", "demo",
                                   "--manager", address.group(1), "--data", str(tmp_path / "w")], env=config,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        first = read_line(worker, 20)
        assert "WARNING: this worker runs --insecure" in first, first
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "joined manager" not in first:  # bounded
            first = read_line(worker, 20)
        status = cp("status", "--json", "--manager", address.group(1), env=config)  # no token: the demo's record
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["manager"]["security"] == "insecure"
        assert not (Path(config["XDG_CONFIG_HOME"]) / "cpcli").exists(), "a demo makes no keys"
    finally:
        for proc in (worker, manager):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(30)
