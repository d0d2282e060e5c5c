"""The control plane under CurveZMQ: members get in, strangers get a clear refusal and nothing else.

Real sockets on 127.0.0.1, the objects in this process: the manager's Router and the Dealers of
workers and clients, archive servers and their links, clock probes, and a Manager with a WorkerAgent
across a token rotation.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils import z85

from cpcli.clock import ClockMapping
from cpcli.clocksync import Probe
from cpcli.cluster import keys
from cpcli.cluster import messages as m
from cpcli.cluster.archive_server import ArchiveServer
from cpcli.cluster.channel import Dealer, Router
from cpcli.cluster.client import RemoteRun, cluster_status
from cpcli.cluster.clocknet import MAGIC, ClockClient, ClockServer, clock_key
from cpcli.cluster.keys import KeyRing
from cpcli.cluster.manager import Manager, ManagerConfig
from cpcli.cluster.timing import ClusterTiming
from cpcli.cluster.transfer import ArchiveLink, NotMemberError
from cpcli.cluster.worker import WorkerAgent, WorkerConfig
from cpcli.errors import CpError
from cpcli.recipe import parse_recipe
from cpcli.registry import Registry
from cpcli.runtime.session import RunOptions, StopControl
from cpcli.transport.curve import PENALTY_S, THROTTLE_AFTER, Credentials
from cpcli.transport.protocol import PROTOCOL_VERSION, pack_object

pytestmark = pytest.mark.timeout(60)

WAIT_S = 5.0  # every wait below is bounded by this (a handshake on loopback takes milliseconds)
QUIET_S = 0.5  # how long "nothing arrives" is watched for
FAST = ClusterTiming(beat_s=0.2, register_timeout_s=1.0, backoff_min_s=0.1, backoff_max_s=0.4, answer_timeout_s=3.0)
log = logging.getLogger("test.security")


def _until(done: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> float:
    """Wait (bounded) until `done()`; returns the seconds it took."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"no {what} within {timeout_s:g} s")
        time.sleep(0.01)
    return time.monotonic() - start


def _member(creds: Credentials) -> Credentials:
    """What a machine holding the cluster's join token knows (no manager secret)."""
    return keys.parse_token(keys.encode_token(creds))


def _rotated(creds: Credentials) -> Credentials:
    """The same manager key pair with a new cluster secret (`cp token --rotate`)."""
    return Credentials(creds.cluster, creds.manager_public, secrets.token_bytes(keys.SECRET_BYTES),
                       creds.manager_secret)


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class _Keys:
    """A manager's keys that a test rotates by hand."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds

    def __call__(self) -> Credentials:
        return self.creds


@pytest.fixture
def router(context: zmq.Context[Any], cluster_keys: Credentials) -> Iterator[tuple[Router, _Keys]]:
    holder = _Keys(cluster_keys)
    served = Router(context, "127.0.0.1", 0, log, holder, as_manager=True)
    yield served, holder
    served.close()


def _address(router: Router) -> str:
    return f"{router.host}:{router.port}"


def _dealer(context: zmq.Context[Any], router: Router, creds: Credentials, name: str = "w") -> Dealer:
    return Dealer(context, _address(router), name, log, creds)


def _receive(router: Router, timeout_s: float = WAIT_S) -> tuple[bytes, bytes, dict[str, Any]] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if router.socket.poll(20):
            message = router.receive()
            if message is not None:
                return message
        router.check()
    return None


def _refusal(dealer: Dealer, timeout_s: float = WAIT_S) -> str:
    _until(lambda: dealer.refusal() is not None, "refusal", timeout_s)
    kind = dealer.refusal()
    assert kind is not None
    return kind


def _send(dealer: Dealer, command: bytes, body: dict[str, Any]) -> None:
    _until(lambda: dealer.send(command, body), f"connection for {command.decode()}")


# -- the manager's control socket ---------------------------------------------------------------


def test_members_exchange_messages_both_ways_over_curve(context: zmq.Context[Any], router: tuple[Router, _Keys],
                                                        cluster_keys: Credentials) -> None:
    served, _ = router
    dealer = _dealer(context, served, _member(cluster_keys))
    try:
        _send(dealer, m.STATUS, {"v": PROTOCOL_VERSION})
        got = _receive(served)
        assert got is not None and got[1:] == (m.STATUS, {"v": PROTOCOL_VERSION})
        assert served.send(got[0], m.REFUSED, {"message": "just testing"})
        assert dealer.socket.poll(int(WAIT_S * 1000))
        assert dealer.receive() == (m.REFUSED, {"message": "just testing"})
        assert dealer.refusal() is None
        assert served.gatekeeper.admitted == 1 and served.gatekeeper.refused == 0
        assert served.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE
    finally:
        dealer.close()


def test_an_old_token_is_refused_as_auth_and_its_address_logged_once(
        context: zmq.Context[Any], router: tuple[Router, _Keys], cluster_keys: Credentials,
        caplog: pytest.LogCaptureFixture) -> None:
    served, holder = router
    old = _member(cluster_keys)
    holder.creds = _rotated(cluster_keys)
    caplog.set_level(logging.WARNING, logger=log.name)
    dealers = [_dealer(context, served, old, f"w{i}") for i in range(30)]  # 30 attempts at once (throttled)
    try:
        kinds = [_refusal(d) for d in dealers]
        assert set(kinds) == {"auth"}
        assert served.gatekeeper.refused >= 30 and served.gatekeeper.admitted == 0
        assert not dealers[0].send(m.STATUS, {"v": PROTOCOL_VERSION})  # never connected: nothing queued
        assert _receive(served, QUIET_S) is None
    finally:
        for d in dealers:
            d.close(discard=True)
    refused = [r for r in caplog.records if "refused a connection to the manager from 127.0.0.1" in r.getMessage()]
    assert len(refused) == 1 and "not a member of cluster lab" in refused[0].getMessage()


def test_a_token_for_another_manager_key_is_refused_as_keys(context: zmq.Context[Any], router: tuple[Router, _Keys],
                                                            cluster_keys: Credentials) -> None:
    served, _ = router
    stranger_key = zmq.curve_public(z85.encode(secrets.token_bytes(32)))
    wrong = Credentials("lab", stranger_key, cluster_keys.secret)
    dealer = _dealer(context, served, wrong)
    try:
        assert _refusal(dealer) == "keys"
        assert _receive(served, QUIET_S) is None
    finally:
        dealer.close(discard=True)


def test_strangers_without_curve_get_nothing_and_members_are_still_served(
        context: zmq.Context[Any], router: tuple[Router, _Keys], cluster_keys: Credentials) -> None:
    served, _ = router
    plain = context.socket(zmq.DEALER)  # the NULL mechanism: a stranger's pyzmq with no keys
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(f"tcp://{_address(served)}")
    try:
        plain.send_multipart([m.STATUS, pack_object({"v": PROTOCOL_VERSION})])
        for size in (1, 64, 4096, 65536):  # raw TCP noise, and a ZMTP greeting followed by noise
            with socket.create_connection(("127.0.0.1", served.port), timeout=2) as conn:
                conn.sendall(secrets.token_bytes(size))
        with socket.create_connection(("127.0.0.1", served.port), timeout=2) as conn:
            conn.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32)
                         + secrets.token_bytes(256))
        assert _receive(served, QUIET_S) is None
        assert not plain.poll(0)
        member = _dealer(context, served, _member(cluster_keys))
        try:
            _send(member, m.STATUS, {"v": PROTOCOL_VERSION})
            got = _receive(served)
            assert got is not None and got[1] == m.STATUS
        finally:
            member.close()
    finally:
        plain.close()


def test_cluster_status_with_a_rotated_token_says_not_a_member_at_once(
        router: tuple[Router, _Keys], cluster_keys: Credentials) -> None:
    served, holder = router
    old = _member(cluster_keys)
    holder.creds = _rotated(cluster_keys)
    start = time.monotonic()
    with pytest.raises(CpError) as caught:
        cluster_status(_address(served), ClusterTiming(answer_timeout_s=10.0), old)
    assert time.monotonic() - start < 2.0  # the refusal, not the answer timeout
    assert "not a member of cluster lab" in caught.value.message
    assert caught.value.hint is not None and "cp token --save" in caught.value.hint


def test_repeated_refusals_from_one_address_are_slowed(context: zmq.Context[Any], router: tuple[Router, _Keys],
                                                       cluster_keys: Credentials) -> None:
    served, _ = router
    guess = Credentials("lab", cluster_keys.manager_public, secrets.token_bytes(keys.SECRET_BYTES))
    first = [_dealer(context, served, guess, f"g{i}") for i in range(THROTTLE_AFTER + 1)]
    try:
        for d in first:
            _refusal(d)
    finally:
        for d in first:
            d.close(discard=True)
    assert served.gatekeeper.refused > THROTTLE_AFTER
    late = _dealer(context, served, guess, "late")
    try:
        took = _until(lambda: late.refusal() is not None, "late refusal")
    finally:
        late.close(discard=True)
    assert served.gatekeeper.throttled >= 1
    assert took >= PENALTY_S * 0.9
    member = _dealer(context, served, _member(cluster_keys))  # a member from the same address is not slowed
    try:
        assert _until(lambda: member.send(m.STATUS, {"v": PROTOCOL_VERSION}), "member connection") < PENALTY_S / 2
    finally:
        member.close()


def test_rebind_after_a_rotation_cuts_old_tokens_and_admits_new_ones(
        context: zmq.Context[Any], router: tuple[Router, _Keys], cluster_keys: Credentials) -> None:
    served, holder = router
    old = _dealer(context, served, _member(cluster_keys), "old")
    try:
        _send(old, m.STATUS, {"v": PROTOCOL_VERSION})
        assert _receive(served) is not None
        holder.creds = _rotated(cluster_keys)
        port = served.port
        served.rebind()
        assert served.port == port and served.credentials is holder.creds
        assert _refusal(old) == "auth"
        old.send(m.STATUS, {"v": PROTOCOL_VERSION})
        assert _receive(served, QUIET_S) is None
        new = _dealer(context, served, _member(holder.creds), "new")
        try:
            _send(new, m.STATUS, {"v": PROTOCOL_VERSION})
            got = _receive(served)
            assert got is not None and got[0].startswith(b"new.")
        finally:
            new.close()
    finally:
        old.close(discard=True)


def test_insecure_credentials_mean_no_curve(context: zmq.Context[Any]) -> None:
    demo = Credentials.demo("lab")
    served = Router(context, "127.0.0.1", 0, log, lambda: demo)
    plain = context.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    try:
        assert served.socket.getsockopt(zmq.MECHANISM) == zmq.NULL
        plain.connect(f"tcp://{_address(served)}")
        plain.send_multipart([m.STATUS, pack_object({"v": PROTOCOL_VERSION})])
        got = _receive(served)
        assert got is not None and got[1] == m.STATUS
    finally:
        plain.close()
        served.close()


# -- archive servers ------------------------------------------------------------------------------


def test_an_archive_server_refuses_a_stranger_and_serves_a_member(tmp_path: Path, cluster_keys: Credentials,
                                                                   context: zmq.Context[Any],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    (data / "s1" / "w9" / "cam").mkdir(parents=True)
    (data / "s1" / "w9" / "cam" / "video.timestamps.csv").write_bytes(b"index,t_ns\n0,0\n")
    member = _member(cluster_keys)
    stranger = Credentials("lab", cluster_keys.manager_public, secrets.token_bytes(keys.SECRET_BYTES))
    fetch = {"session": "s1", "path": "w9/cam/video.timestamps.csv", "offset": 0, "size": 100}
    with ArchiveServer(data, "127.0.0.1", "w9", log, lambda: member) as server:
        plain = context.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(server.address)
        bad = ArchiveLink(context, server.address, 10.0, stranger)
        try:
            plain.send_multipart([m.FETCH, b"\x80"])
            start = time.monotonic()
            with pytest.raises(NotMemberError) as caught:
                bad.request(m.FETCH, fetch, m.CHUNK)
            assert time.monotonic() - start < 2.0
            # another secret is another member key: the stranger cannot even open the handshake ("keys")
            assert caught.value.message.startswith(f"archive server at {server.address} refused this machine")
            assert not plain.poll(int(QUIET_S * 1000))
            assert server.served_bytes == 0
            good = ArchiveLink(context, server.address, 3.0, member)
            try:
                good.send(m.FETCH, fetch)
                command, _, chunk = good.receive()
                assert command == m.CHUNK and bytes(chunk) == b"index,t_ns\n0,0\n"
            finally:
                good.close()
        finally:
            bad.close()
            plain.close()
    assert server.served_bytes == len(b"index,t_ns\n0,0\n")
    # one line for both strangers, or "1 connection" first when the server saw them in two looks
    assert any(re.search(r"refused \d+ connections? to the archive server that did not hold this cluster's keys",
                         r.getMessage()) for r in caplog.records)


def test_an_archive_server_listens_again_with_new_keys(tmp_path: Path, cluster_keys: Credentials,
                                                        context: zmq.Context[Any]) -> None:
    (tmp_path / "data" / "s1" / "w9").mkdir(parents=True)
    holder = _Keys(_member(cluster_keys))
    old = holder.creds
    with ArchiveServer(tmp_path / "data", "127.0.0.1", "w9", log, holder) as server:
        holder.creds = _member(_rotated(cluster_keys))
        _until(lambda: server.credentials is holder.creds, "the archive server listening with the new keys")
        link = ArchiveLink(context, server.address, 3.0, holder.creds)
        stale = ArchiveLink(context, server.address, 3.0, old)
        try:
            listed = link.request(m.SESSIONS, {}, m.SESSION_LIST)
            assert [s["name"] for s in listed["sessions"]] == ["s1"]
            with pytest.raises(NotMemberError):
                stale.request(m.SESSIONS, {}, m.SESSION_LIST)
        finally:
            link.close()
            stale.close()


# -- clock probes ---------------------------------------------------------------------------------


def test_clock_probes_with_a_wrong_key_are_ignored_and_counted(cluster_keys: Credentials) -> None:
    key = clock_key(cluster_keys)
    assert key is not None
    server = ClockServer("127.0.0.1", 0, lambda: key)
    server.start()
    estimates: list[ClockMapping] = []

    def on_estimate(mapping: ClockMapping, _best: Probe) -> None:
        estimates.append(mapping)

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:  # today's unkeyed probe: ignored
            raw.settimeout(QUIET_S)
            raw.sendto(MAGIC + bytes(16), ("127.0.0.1", server.port))
            with pytest.raises(TimeoutError):
                raw.recvfrom(128)
        wrong = ClockClient("127.0.0.1", server.port, on_estimate, interval_s=0.05, key=secrets.token_bytes(32))
        wrong.start()
        try:
            _until(lambda: wrong.lost >= 8, "a lost burst")
        finally:
            wrong.close()
        assert server.answered == 0 and server.ignored >= 9 and not estimates
        right = ClockClient("127.0.0.1", server.port, on_estimate, interval_s=0.05, key=key)
        right.start()
        try:
            _until(lambda: len(estimates) >= 2, "clock estimates")
        finally:
            right.close()
        assert server.answered >= 8
        assert abs(estimates[-1].offset_ns) < 5_000_000  # one clock: the offset is the loopback noise
    finally:
        server.close()


def test_an_unkeyed_clock_server_answers_the_unkeyed_format() -> None:
    server = ClockServer("127.0.0.1", 0, lambda: None)
    server.start()
    estimates: list[ClockMapping] = []
    client = ClockClient("127.0.0.1", server.port, lambda mapping, _best: estimates.append(mapping),
                         interval_s=0.05, key=None)
    client.start()
    try:
        _until(lambda: bool(estimates), "a clock estimate")
    finally:
        client.close()
        server.close()


# -- a manager and a worker ---------------------------------------------------------------------


class _Running:
    """A manager or worker loop on a thread of this test, stopped and joined at the end."""

    def __init__(self, target: Callable[[], None], name: str, stop: threading.Event) -> None:
        self.stop = stop
        self.error: list[BaseException] = []

        def run() -> None:
            try:
                target()
            except BaseException as err:  # handed to the test
                self.error.append(err)

        self.thread = threading.Thread(target=run, name=name, daemon=True)

    def start(self) -> _Running:
        self.thread.start()
        return self

    def join(self) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop"


def _token_ring(path: Path) -> KeyRing:
    """A member's keys from a token file of its own, reloaded when it changes (as `cp token --save` does)."""
    return KeyRing(lambda: keys.parse_token(path.read_text()), path)


def test_a_worker_cut_off_by_a_rotation_rejoins_once_it_gets_the_new_token(
        tmp_path: Path, cluster_keys: Credentials, registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    token = tmp_path / "worker-token"
    token.write_text(keys.encode_token(cluster_keys))
    said: list[str] = []
    manager_stop = threading.Event()
    manager = Manager(ManagerConfig("m1", "lab", "127.0.0.1", 0, tmp_path / "m1", KeyRing.for_manager("lab"), FAST),
                      manager_stop, logging.getLogger("test.manager"), said.append)
    address = f"127.0.0.1:{manager.port}"
    manager_loop = _Running(manager.run, "test-manager", manager_stop)
    worker_said: list[str] = []
    worker_stop = threading.Event()
    agent = WorkerAgent(WorkerConfig("w1", "127.0.0.1", tmp_path / "w1", address, _token_ring(token), FAST),
                        registry, worker_stop, logging.getLogger("test.worker"), worker_said.append)
    worker_loop = _Running(agent.run, "test-worker", worker_stop)
    manager_loop.start()
    worker_loop.start()
    try:
        _until(lambda: "w1" in manager.workers and manager.workers["w1"].state == "ready", "worker w1 joined")
        _until(lambda: agent.clock is not None, "the worker's clock aligned (keyed probes)")
        status = cluster_status(address, FAST, _member(cluster_keys))
        assert status["manager"]["security"] == "curve"
        assert status["manager"]["key"] == cluster_keys.fingerprint
        assert [w["name"] for w in status["workers"]] == ["w1"]

        new = keys.rotate("lab")
        _until(lambda: any("cluster secret rotated" in line for line in said), "the rotation announced")
        _until(lambda: any("not a member of cluster lab" in r.getMessage() for r in caplog.records
                           if r.name == "test.worker"), "the worker's refusal logged")
        with pytest.raises(CpError, match="not a member of cluster lab"):
            cluster_status(address, FAST, _member(cluster_keys))
        time.sleep(FAST.backoff_max_s * 3)  # several retries: still one log line
        refusals = [r for r in caplog.records if r.name == "test.worker" and "not a member" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
        assert "cp token --save" in refusals[0].getMessage()
        assert not worker_loop.error

        token.write_text(keys.encode_token(new))  # `cp token --save NEW` on the worker's machine
        _until(lambda: sum("joined manager m1" in line for line in worker_said) >= 2, "the worker rejoined", 10)
        status = cluster_status(address, FAST, _member(new))
        assert {w["name"]: w["state"] for w in status["workers"]} == {"w1": "ready"}
        assert agent._clock_client is not None and agent._clock_client.key == new.clock_key
    finally:
        worker_loop.join()
        manager_loop.join()
    assert not worker_loop.error and not manager_loop.error


def test_a_worker_that_never_joined_ends_with_the_refusal(tmp_path: Path, cluster_keys: Credentials,
                                                          registry: Registry) -> None:
    manager_stop = threading.Event()
    manager = Manager(ManagerConfig("m1", "lab", "127.0.0.1", 0, tmp_path / "m1", KeyRing.for_manager("lab"), FAST),
                      manager_stop, logging.getLogger("test.manager"))
    manager_loop = _Running(manager.run, "test-manager", manager_stop)
    manager_loop.start()
    try:
        stranger = KeyRing.fixed(Credentials("lab", cluster_keys.manager_public, secrets.token_bytes(16)))
        agent = WorkerAgent(WorkerConfig("w1", "127.0.0.1", tmp_path / "w1", f"127.0.0.1:{manager.port}", stranger,
                                         FAST), registry, threading.Event(), logging.getLogger("test.worker"))
        start = time.monotonic()
        with pytest.raises(CpError) as caught:
            agent.run()
        assert time.monotonic() - start < 3.0
        assert "manager at 127.0.0.1" in caught.value.message and "not a member of cluster lab" in caught.value.message
        assert manager.workers == {}
    finally:
        manager_loop.join()


SESSION = """\
name: keyed
nodes:
  c:
    type: counter
    worker: w1
    params: {rate_hz: 50}
    record: true
  sink:
    type: discard
    worker: w1
    inputs: [c]
"""


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypted", "plain-data"])
def test_a_session_runs_on_a_keyed_cluster(tmp_path: Path, cluster_keys: Credentials, registry: Registry,
                                           encrypt: bool) -> None:
    ring = KeyRing.for_manager("lab")
    manager_stop, worker_stop = threading.Event(), threading.Event()
    manager = Manager(ManagerConfig("m1", "lab", "127.0.0.1", 0, tmp_path / "m1", ring, FAST), manager_stop,
                      logging.getLogger("test.manager"))
    address = f"127.0.0.1:{manager.port}"
    agent = WorkerAgent(WorkerConfig("w1", "127.0.0.1", tmp_path / "w1", address, ring, FAST), registry,
                        worker_stop, logging.getLogger("test.worker"))
    manager_loop = _Running(manager.run, "test-manager", manager_stop).start()
    worker_loop = _Running(agent.run, "test-worker", worker_stop).start()
    try:
        _until(lambda: "w1" in manager.workers and agent.clock is not None, "worker w1 joined, its clock aligned")
        recipe = parse_recipe(SESSION, registry)
        run = RemoteRun(address, recipe, registry, RunOptions(duration_s=1.0, encrypt_data=encrypt), StopControl(),
                        FAST, lambda: _member(cluster_keys))
        result = run.run()
        assert result.manifest["status"] == "complete", result.manifest
        sent = result.nodes["c"].stats.samples_out
        assert sent >= 20 and result.nodes["sink"].stats.samples_in == {"c": sent}
    finally:
        worker_loop.join()
        manager_loop.join()
    assert not worker_loop.error and not manager_loop.error
