"""`cp manager`, `cp worker` and `cp status`: the cluster from the command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType

import typer

from cpcli.cli.output import err_console, out_console
from cpcli.cluster import keys
from cpcli.cluster.discovery import DEFAULT_CLUSTER, Advertiser, ManagerAdvert, find_manager, interface_for
from cpcli.cluster.keys import KeyRing
from cpcli.cluster.locate import announce_local, forget_record, locate
from cpcli.cluster.machine import address_towards, default_interface, manager_address
from cpcli.cluster.messages import NAME_RE
from cpcli.cluster.timing import ClusterTiming
from cpcli.cluster.worker import WorkerAgent, WorkerConfig
from cpcli.errors import CpError, PeerLostError, TransportError
from cpcli.registry import load_registry
from cpcli.runtime.session import local_worker_name
from cpcli.transport.curve import Credentials

DEFAULT_PORT = 7425
# A worker waits this long after the first answer for a second manager of its cluster (answers to
# one query come within 20-120 ms, RFC 6762 §6); the full SETTLE_S would add a second to every join.
WORKER_SETTLE_S = 0.25
TIMING_ENV = "CP_CLUSTER_TIMING"
EXIT_INTERRUPTED = 130


def timing_from_env() -> ClusterTiming:
    return ClusterTiming.from_env(os.environ.get(TIMING_ENV))


def say(line: str) -> None:
    """A progress line of a long-running command, stamped with the local time."""
    err_console.print(f"{datetime.now().strftime('%H:%M:%S')} {line}", markup=False, highlight=False)


@contextmanager
def _stop_on_signals(stop: threading.Event, forced: threading.Event) -> Iterator[list[bool]]:
    interrupted = [False]

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        interrupted[0] = interrupted[0] or signum == signal.SIGINT
        if stop.is_set():
            forced.set()
        stop.set()

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _check_name(what: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise CpError(f"{what} {value!r} must be 1-30 letters, digits, '.', '_' or '-', starting with a letter or "
                      "digit", hint=f"pass another --{what}")
    return value


def token_option() -> str:
    """The `--token` option every command that talks to a cluster takes."""
    value: str = typer.Option(None, "--token", help="The cluster's join token (`cp token` prints it on the manager's "
                              "machine; or CP_TOKEN). Not needed there, nor once stored with `cp token --save`.")
    return value


def _warn_insecure(what: str) -> None:
    say(f"WARNING: {what} runs --insecure: no keys, nothing encrypted, any program on this machine can run "
        "recipes and read recordings; use it only for a demo")


def _manager_keys(cluster: str, host: str, insecure: bool) -> KeyRing:
    if insecure:
        if not host.startswith("127."):
            raise CpError(f"--insecure is only for a demo on one machine, not on {host}",
                          hint="pass --interface 127.0.0.1, or drop --insecure (workers then need `cp token`)")
        _warn_insecure("this manager")
        return KeyRing.fixed(Credentials.demo(cluster))
    made = keys.manager_keys(cluster, create=False) is None
    ring = KeyRing.for_manager(cluster)
    if made:
        say(f"made new keys of cluster {cluster} in {keys.cluster_dir(cluster)} (keep them: workers join with them)")
    return ring


def _interface(given: str | None) -> str:
    chosen = default_interface(given)
    interface_for(chosen)  # a clear error when it is not an address of this machine
    return chosen


def manager_command(
    name: str = typer.Option(None, "--name", help="Manager name (default: this machine's host name)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port of the control socket."),
    interface: str = typer.Option(None, "--interface", help="IPv4 address to listen and advertise on "
                                  "(default: CP_INTERFACE, else the default route's)."),
    data: Path = typer.Option(Path("sessions"), "--data", help="Folder for session records (and the local "
                              "worker's recordings)."),
    no_local_worker: bool = typer.Option(False, "--no-local-worker", help="Run no worker in this process."),
    cluster: str = typer.Option(DEFAULT_CLUSTER, "--cluster", help="Cluster name: workers join only their own."),
    insecure: bool = typer.Option(False, "--insecure", help="No keys and no encryption: only for a demo on one "
                                  "machine (needs --interface 127.0.0.1)."),
) -> int:
    """Coordinate the lab's workers; advertised over mDNS. Runs a local worker too unless told not to.

    The first start of a cluster makes its keys (in ~/.config/cpcli); it prints the join token
    workers and clients on other machines need (`cp token` shows it again).
    """
    name = _check_name("name", name or local_worker_name()[:30])
    _check_name("cluster", cluster)
    if not 0 <= port < 65536:
        raise CpError(f"--port {port} is not a TCP port", hint="use 1-65535, or 0 for any free port")
    host = _interface(interface)
    ring = _manager_keys(cluster, host, insecure)
    creds = ring.current()
    timing = timing_from_env()
    stop, forced = threading.Event(), threading.Event()
    from cpcli.cluster.manager import Manager, ManagerConfig  # only `cp manager` needs the coordinator

    manager = Manager(ManagerConfig(name, cluster, host, port, data.resolve(), ring, timing,
                                    None if no_local_worker else name), stop,
                      logging.getLogger("cpcli.manager"), say)
    address = f"{host}:{manager.port}"
    advertiser = None
    if not host.startswith("127."):
        advertiser = Advertiser(ManagerAdvert(cluster, name, host, manager.port, key=creds.fingerprint), host)
        try:
            advertiser.start()
        except TransportError:
            manager.router.close()
            raise
    local_file = announce_local(cluster, name, address, creds.fingerprint, creds.insecure)
    worker_thread = None
    worker_error: list[CpError] = []
    worker_stop = threading.Event()
    if not no_local_worker:
        agent = WorkerAgent(WorkerConfig(name, host, data.resolve(), address, ring, timing), load_registry(),
                            worker_stop, logging.getLogger("cpcli.worker"), lambda line: say(f"[local worker] {line}"))

        def run_worker() -> None:
            try:
                agent.run()
            except CpError as err:
                worker_error.append(err)
                stop.set()

        worker_thread = threading.Thread(target=run_worker, name="local-worker", daemon=True)
    where = f"advertised over mDNS on {host}" if advertiser else "not advertised (loopback)"
    say(f"manager {name} of cluster {cluster} listening on {address}, {where}; data in {data.resolve()}"
        + ("" if no_local_worker else f"; local worker {name}"))
    if not creds.insecure:
        say(f"join token of cluster {cluster} (on each worker machine, once: cp worker --token TOKEN; "
            f"`cp token` shows it again): {keys.encode_token(creds)}")
    with _stop_on_signals(stop, forced) as interrupted:
        if worker_thread is not None:
            worker_thread.start()
        try:
            manager.run()
        finally:
            worker_stop.set()
            if worker_thread is not None:
                worker_thread.join(60)
            forget_record(local_file)
            if advertiser is not None:
                advertiser.stop()
    if worker_error:
        raise worker_error[0]
    say(f"manager {name} stopped")
    return EXIT_INTERRUPTED if interrupted[0] else 0


def worker_command(
    name: str = typer.Option(None, "--name", help="Worker name, used in recipes' `worker:` (default: host name)."),
    manager: str = typer.Option(None, "--manager", help="HOST:PORT of the manager (default: find it over mDNS)."),
    interface: str = typer.Option(None, "--interface", help="IPv4 address to use (default: CP_INTERFACE, else the "
                                  "one towards the manager)."),
    data: Path = typer.Option(Path("sessions"), "--data", help="Folder where this worker records."),
    cluster: str = typer.Option(None, "--cluster", help="Join only the manager of this cluster (default: the "
                                "token's, else default)."),
    token: str = token_option(),
    insecure: bool = typer.Option(False, "--insecure", help="Join a manager running --insecure on this machine "
                                  "(a demo: needs --manager 127.0.0.1:PORT)."),
) -> int:
    """Join the lab's manager and run the nodes it places here, recording locally.

    The first time, pass the cluster's join token (`cp token` on the manager's machine prints it);
    it is stored, and `cp worker` then joins with no arguments.
    """
    name = _check_name("name", name or local_worker_name()[:30])
    if manager:
        manager_address(manager)  # a mistyped address is said first
    ring, cluster = _worker_keys(cluster, token, insecure, manager)
    timing = timing_from_env()
    stop, forced = threading.Event(), threading.Event()
    with _stop_on_signals(stop, forced) as interrupted:
        if manager:
            manager_host, _ = manager_address(manager)
            host = _interface(interface) if interface or os.environ.get("CP_INTERFACE") else \
                address_towards(manager_host)
            address = manager
        else:
            host = _interface(interface)
            found = _discover(host, cluster, timing, stop, ring.current().fingerprint)
            if found is None:
                return EXIT_INTERRUPTED
            address = found
        agent = WorkerAgent(WorkerConfig(name, host, data.resolve(), address, ring, timing), load_registry(), stop,
                            logging.getLogger("cpcli.worker"), say)
        say(f"worker {name} on {host}: joining the manager at {address}; recording into {data.resolve()}")
        agent.run()
    say(f"worker {name} stopped")
    return EXIT_INTERRUPTED if interrupted[0] else 0


def _worker_keys(cluster: str | None, token: str | None, insecure: bool, manager: str | None) -> tuple[KeyRing, str]:
    """The worker's credentials (a given token is stored first), and its cluster."""
    if cluster is not None:
        _check_name("cluster", cluster)
    if insecure:
        if token:
            raise CpError("--insecure and --token exclude each other", hint="drop one of them")
        if not manager or not manager_address(manager)[0].startswith("127."):
            raise CpError("--insecure joins only a demo manager on this machine",
                          hint="pass --manager 127.0.0.1:PORT, or drop --insecure and use the cluster's token")
        _warn_insecure("this worker")
        name = cluster or DEFAULT_CLUSTER
        return KeyRing.fixed(Credentials.demo(name)), name
    from_env = os.environ.get(keys.TOKEN_ENV)
    if token or from_env:
        given = keys.parse_token(token or from_env or "", "--token" if token else keys.TOKEN_ENV)
        if cluster is not None and cluster != given.cluster:
            raise CpError(f"the join token is for cluster {given.cluster}, not {cluster}",
                          hint=f"drop --cluster, or pass the token of cluster {cluster}")
        if token and keys.manager_keys(given.cluster, create=False) is None:  # the manager's machine needs none
            path = keys.save_token(given)
            say(f"stored the join token of cluster {given.cluster} in {path}; next time `cp worker` needs no --token")
        cluster = given.cluster
    elif cluster is None:
        known = keys.known_clusters()
        cluster = known[0] if len(known) == 1 else DEFAULT_CLUSTER
    return KeyRing.for_member(cluster), cluster


def _discover(interface: str, cluster: str, timing: ClusterTiming, stop: threading.Event, key: str) -> str | None:
    """Search mDNS until the manager of `cluster` holding the token's key answers (it may start after the worker)."""
    said = False
    while not stop.is_set():
        try:
            advert = find_manager(interface, timing.discovery_s, cluster, settle_s=WORKER_SETTLE_S,
                                  key=None if key == "insecure" else key)
        except PeerLostError as err:
            if not said:  # the message lists managers heard but passed over (other clusters, releases)
                other = "; pass --cluster NAME to join another cluster" if "; ignored: " in err.message else ""
                say(f"{err.message}; still looking (Ctrl-C to give up){other}")
                said = True
            continue
        say(f"found manager {advert.describe()}")
        return advert.address
    return None


def status_command(
    manager: str = typer.Option(None, "--manager", help="HOST:PORT of the manager (default: find it)."),
    interface: str = typer.Option(None, "--interface", help="IPv4 address to search for the manager on."),
    cluster: str = typer.Option(None, "--cluster", help="The cluster to show, when several managers answer."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON, for scripts."),
    token: str = token_option(),
) -> int:
    """One look at the cluster: manager, workers and the running session."""
    timing = timing_from_env()
    ref = locate(manager, interface, cluster, timing.discovery_s, required=True)
    assert ref is not None
    from cpcli.cluster.client import cluster_status

    status = cluster_status(ref.address, timing, ref.credentials(token))
    if as_json:
        out_console.print_json(json.dumps(status, default=str))
    else:
        from cpcli.cli.status import status_view  # rich tables: only for a terminal

        for renderable in status_view(status):
            out_console.print(renderable)
    return 0
