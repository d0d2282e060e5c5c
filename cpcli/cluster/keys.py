"""A cluster's keys on disk and its join token: made by the first `cp manager`, stored once by each member.

Layout under `$XDG_CONFIG_HOME/cpcli` (default `~/.config/cpcli`), folders 0700, files 0600:
`clusters/<cluster>/manager.json` on the manager's machine (its Curve key pair and the cluster
secret), `clusters/<cluster>/token` on a member's (the join token). A file that other users can
read is refused, the way ssh refuses a readable private key.

A join token is `cp1:<cluster>:<base64url(manager public key, cluster secret, check)>`, one line
that survives copy and paste in a terminal, a chat or an email.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import zmq
from zmq.utils import z85

from cpcli.cluster.messages import NAME_RE
from cpcli.errors import AccessError, CpError
from cpcli.transport.curve import Credentials

TOKEN_ENV = "CP_TOKEN"
TOKEN_PREFIX = "cp1"
SECRET_BYTES = 16  # 128 bits: beyond guessing, short enough to paste
CHECK_BYTES = 4  # catches a token mangled in copying
MANAGER_FILE = "manager.json"
TOKEN_FILE = "token"
RELOAD_S = 1.0  # a KeyRing looks at its file at most this often


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cpcli"


def cluster_dir(cluster: str) -> Path:
    return config_dir() / "clusters" / cluster


def _public(secret_z85: bytes) -> bytes:
    # derived, not zmq.curve_keypair(): the pyzmq 27.3 wheel's keypair does not match (public != f(secret))
    return zmq.curve_public(secret_z85)


# -- tokens ------------------------------------------------------------------------------------


def encode_token(creds: Credentials) -> str:
    payload = z85.decode(creds.manager_public) + creds.secret
    check = hashlib.sha256(f"{TOKEN_PREFIX}:{creds.cluster}:".encode() + payload).digest()[:CHECK_BYTES]
    body = base64.urlsafe_b64encode(payload + check).decode().rstrip("=")
    return f"{TOKEN_PREFIX}:{creds.cluster}:{body}"


def parse_token(text: str, where: str = "the join token") -> Credentials:
    """Credentials from a token; CpError (one line) naming what is wrong with it."""
    hint = "copy the whole line `cp token` prints on the manager's machine (it starts with cp1:)"
    token = text.strip()
    parts = token.split(":")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AccessError(f"{where} is not a cpcli join token (expected cp1:CLUSTER:KEY, got {token[:24]!r}...)",
                      hint=hint)
    cluster, body = parts[1], parts[2]
    if not NAME_RE.fullmatch(cluster):
        raise AccessError(f"{where} names cluster {cluster[:40]!r}, which is not a cluster name", hint=hint)
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as err:
        raise AccessError(f"{where} for cluster {cluster} is damaged (not base64)", hint=hint) from err
    if len(raw) != 32 + SECRET_BYTES + CHECK_BYTES:
        raise AccessError(f"{where} for cluster {cluster} is {'too short' if len(raw) < 52 else 'too long'} "
                      "(cut off or joined with something)", hint=hint)
    payload, check = raw[:-CHECK_BYTES], raw[-CHECK_BYTES:]
    expected = hashlib.sha256(f"{TOKEN_PREFIX}:{cluster}:".encode() + payload).digest()[:CHECK_BYTES]
    if not secrets.compare_digest(check, expected):
        raise AccessError(f"{where} for cluster {cluster} is damaged (its check digits do not match)", hint=hint)
    return Credentials(cluster, z85.encode(payload[:32]), payload[32:])


# -- files ---------------------------------------------------------------------------------------


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CpError(f"{path} can be read by other users (mode {mode:04o}); cpcli refuses to use keys others can "
                      "read", hint=f"chmod 600 {path}")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _manager_record(creds: Credentials, generation: int) -> str:
    assert creds.manager_secret is not None
    return json.dumps({"cluster": creds.cluster, "manager_public": creds.manager_public.decode(),
                       "manager_secret": creds.manager_secret.decode(), "secret": creds.secret.hex(),
                       "generation": generation, "written_utc": datetime.now(timezone.utc).isoformat()}, indent=1)


def _read_manager(path: Path) -> tuple[Credentials, int]:
    _check_private(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manager_secret = str(data["manager_secret"]).encode()
        creds = Credentials(str(data["cluster"]), _public(manager_secret), bytes.fromhex(str(data["secret"])),
                            manager_secret)
        generation = int(data.get("generation", 1))
    except (OSError, ValueError, KeyError, TypeError, zmq.ZMQError) as err:
        raise CpError(f"the cluster keys in {path} are unreadable ({type(err).__name__})",
                      hint="restore the file from a backup; or move it away and start `cp manager` to make new "
                           "keys (every worker then needs the new token)") from err
    if len(creds.secret) != SECRET_BYTES:
        raise CpError(f"the cluster keys in {path} are damaged (the secret has the wrong length)",
                      hint="restore the file from a backup")
    return creds, generation


def manager_keys(cluster: str, *, create: bool) -> Credentials | None:
    """This machine's manager keys of `cluster`; made when `create` and none exist yet."""
    path = cluster_dir(cluster) / MANAGER_FILE
    if path.exists():
        return _read_manager(path)[0]
    if not create:
        return None
    manager_secret = z85.encode(secrets.token_bytes(32))
    creds = Credentials(cluster, _public(manager_secret), secrets.token_bytes(SECRET_BYTES), manager_secret)
    _write_private(path, _manager_record(creds, 1))
    return creds


def rotate(cluster: str) -> Credentials:
    """A new cluster secret (the manager keeps its key pair): every member needs the new token."""
    path = cluster_dir(cluster) / MANAGER_FILE
    if not path.exists():
        raise CpError(f"no keys of cluster {cluster} on this machine", hint="run `cp token --rotate` on the manager's "
                      "machine (where `cp manager` made them)")
    old, generation = _read_manager(path)
    creds = Credentials(cluster, old.manager_public, secrets.token_bytes(SECRET_BYTES), old.manager_secret)
    _write_private(path, _manager_record(creds, generation + 1))
    return creds


def save_token(creds: Credentials) -> Path:
    path = cluster_dir(creds.cluster) / TOKEN_FILE
    _write_private(path, encode_token(creds) + "\n")
    return path


def stored_token(cluster: str) -> Credentials | None:
    path = cluster_dir(cluster) / TOKEN_FILE
    if not path.exists():
        return None
    _check_private(path)
    return parse_token(path.read_text(encoding="utf-8"), f"the token stored in {path}")


def known_clusters() -> list[str]:
    """Clusters this machine holds keys or a token of."""
    root = config_dir() / "clusters"
    try:
        return sorted(p.name for p in root.iterdir()
                      if (p / MANAGER_FILE).exists() or (p / TOKEN_FILE).exists())
    except OSError:
        return []


def member_credentials(cluster: str | None, token: str | None) -> Credentials:
    """The credentials a member uses: `token` (or CP_TOKEN), else the manager's keys here, else a stored token.

    `cluster` None: the cluster of the token, or the only one this machine knows.
    """
    given = token or os.environ.get(TOKEN_ENV)
    if given:
        creds = parse_token(given, "--token" if token else TOKEN_ENV)
        if cluster is not None and creds.cluster != cluster:
            raise AccessError(f"the join token is for cluster {creds.cluster}, not {cluster}",
                          hint=f"pass --cluster {creds.cluster}, or the token of cluster {cluster}")
        return creds
    if cluster is None:
        known = known_clusters()
        if len(known) > 1:
            raise AccessError(f"this machine holds keys of {len(known)} clusters ({', '.join(known)})",
                          hint="pass --cluster NAME")
        if not known:
            raise _no_token("any cluster")
        cluster = known[0]
    own = manager_keys(cluster, create=False)
    if own is not None:
        return own
    stored = stored_token(cluster)
    if stored is None:
        raise _no_token(f"cluster {cluster}")
    return stored


def _no_token(what: str) -> AccessError:
    return AccessError(f"this machine has no join token of {what}: it is not a member yet",
                   hint="run `cp token` on the manager's machine, then here `cp token --save TOKEN` "
                        "(or pass --token TOKEN once)")


class KeyRing:
    """The current credentials of a running manager or worker, reloaded when `cp token` changes them on disk."""

    def __init__(self, load: Callable[[], Credentials], path: Path | None = None) -> None:
        self._load = load
        self._path = path
        self._lock = threading.Lock()
        self._creds = load()
        self._stamp = self._file_stamp()
        self._next_check = time.monotonic() + RELOAD_S

    @classmethod
    def fixed(cls, creds: Credentials) -> KeyRing:
        return cls(lambda: creds)

    @classmethod
    def for_manager(cls, cluster: str) -> KeyRing:
        path = cluster_dir(cluster) / MANAGER_FILE

        def load() -> Credentials:
            creds = manager_keys(cluster, create=True)
            assert creds is not None
            return creds
        return cls(load, path)

    @classmethod
    def for_member(cls, cluster: str) -> KeyRing:
        """A worker's: the manager's keys when it runs beside the manager, else the stored token."""
        own = cluster_dir(cluster) / MANAGER_FILE
        path = own if own.exists() else cluster_dir(cluster) / TOKEN_FILE
        return cls(lambda: member_credentials(cluster, None), path)

    def _file_stamp(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def current(self) -> Credentials:
        """The credentials now; a changed file is read again (a bad one keeps the last good credentials)."""
        now = time.monotonic()
        if self._path is None or now < self._next_check:
            return self._creds
        with self._lock:
            self._next_check = now + RELOAD_S
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                with contextlib.suppress(CpError):  # a half-edited or damaged file: keep what worked
                    self._creds = self._load()
            return self._creds
