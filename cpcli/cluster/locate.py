"""Finding the manager and the keys to talk to it: `--manager`, a manager on this machine, or mDNS.

`cp manager` leaves a small file in the user's runtime folder while it runs (one per network
namespace and cluster), so `cp run` and `cp status` on the manager's own machine find it at once,
without a network search. The file names the cluster and the fingerprint of the manager's key
(never a secret); the keys themselves come from `keys.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from cpcli.cluster.discovery import DEFAULT_CLUSTER, find_manager, find_managers
from cpcli.cluster.keys import member_credentials
from cpcli.cluster.machine import INTERFACE_ENV, default_interface, manager_address
from cpcli.errors import AccessError, CpError
from cpcli.transport.curve import Credentials

MANAGER_ENV = "CP_MANAGER"


@dataclass(frozen=True)
class ManagerRef:
    """A manager to talk to: where, of which cluster (when known), its key's fingerprint, whether it runs --insecure."""

    address: str
    cluster: str | None = None
    key: str | None = None
    insecure: bool = False

    def credentials(self, token: str | None) -> Credentials:
        """This machine's credentials for that manager (CpError when it has none, or the wrong ones)."""
        if self.insecure:
            return Credentials.demo(self.cluster or DEFAULT_CLUSTER)
        creds = member_credentials(self.cluster, token)
        if self.key and creds.fingerprint != self.key:
            raise AccessError(f"the manager at {self.address} holds key {self.key}, but this machine's token of "
                              f"cluster {creds.cluster} is for key {creds.fingerprint}",
                              hint="get the current token with `cp token` on the manager's machine and store it "
                                   "here with `cp token --save TOKEN`")
        return creds


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"cpcli-{os.getuid()}"


def netns_id() -> str:
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "host"


def write_record(name: str, data: dict[str, Any]) -> Path:
    """`<runtime dir>/<name>.json` holding `data` and this process's pid, written atomically."""
    path = runtime_dir() / f"{name}.json"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **data}))
    tmp.replace(path)
    return path


def forget_record(path: Path) -> None:
    """Remove a record this process wrote (never another process's)."""
    try:
        data = json.loads(path.read_text())
        if data.get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def live_records(pattern: str) -> list[dict[str, Any]]:
    """The records matching `pattern` whose process still runs."""
    found = []
    for path in sorted(runtime_dir().glob(f"{pattern}.json")):
        try:
            data = json.loads(path.read_text())
            alive = isinstance(data, dict) and psutil.pid_exists(int(data["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive:
            found.append(data)
    return found


def announce_local(cluster: str, name: str, address: str, key: str, insecure: bool) -> Path:
    """Say "a manager runs here"; remove the file with `forget_record` when it stops."""
    return write_record(f"manager-{netns_id()}-{cluster}", {"cluster": cluster, "name": name, "address": address,
                                                            "key": key, "insecure": insecure})


def local_managers(cluster: str | None) -> list[dict[str, Any]]:
    """Managers running on this machine (in this network namespace), of `cluster` when given."""
    return [d for d in live_records(f"manager-{netns_id()}-*") if cluster is None or d.get("cluster") == cluster]


def _local_ref(record: dict[str, Any]) -> ManagerRef:
    return ManagerRef(str(record["address"]), str(record.get("cluster") or DEFAULT_CLUSTER),
                      str(record.get("key") or "") or None, bool(record.get("insecure")))


def locate(manager: str | None, interface: str | None, cluster: str | None, timeout_s: float,
           *, required: bool) -> ManagerRef | None:
    """The manager to use, or None (only when not `required`) if there is none.

    Order: `--manager` (or CP_MANAGER); a manager on this machine; mDNS on `--interface` (or
    CP_INTERFACE). Without an interface chosen, no network search is made unless `required`.
    """
    given = manager or os.environ.get(MANAGER_ENV)
    if given:
        manager_address(given)
        here = [d for d in local_managers(cluster) if d.get("address") == given]
        return _local_ref(here[0]) if here else ManagerRef(given, cluster)
    local = local_managers(cluster)
    if len(local) > 1:
        listed = ", ".join(f"{d['name']} of cluster {d['cluster']} at {d['address']}" for d in local)
        raise CpError(f"{len(local)} managers run on this machine: {listed}", hint="pass --cluster NAME")
    if local:
        return _local_ref(local[0])
    chosen = interface or os.environ.get(INTERFACE_ENV)
    if chosen is None and not required:
        return None
    if chosen is None:
        chosen = default_interface(None)
    if required:
        advert = find_manager(chosen, timeout_s, cluster or None)
        return ManagerRef(advert.address, advert.cluster, advert.key or None)
    found = find_managers(chosen, timeout_s, cluster or DEFAULT_CLUSTER)
    if len(found) > 1:
        raise CpError(f"{len(found)} managers found on {chosen}: {', '.join(a.describe() for a in found)}",
                      hint="pass --cluster NAME or --manager HOST:PORT")
    return ManagerRef(found[0].address, found[0].cluster, found[0].key or None) if found else None
