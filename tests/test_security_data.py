"""The data plane between members only: node publishers admit the session's keys, encrypted unless told not to."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from cpcli.clock import Clock
from cpcli.cluster import keys
from cpcli.errors import RecipeError, TransportError
from cpcli.monitor.feed import PreviewFeed
from cpcli.recipe import parse_recipe
from cpcli.registry import Registry
from cpcli.runtime import security
from cpcli.runtime.plan import NodeState
from cpcli.runtime.session import RunOptions, plan_nodes
from cpcli.runtime.supervisor import Supervisor
from cpcli.runtime.timing import Timing
from cpcli.transport.curve import Credentials, DataSecurity, HandshakeWatch
from cpcli.transport.pubsub import Publisher, topic_for
from cpcli.transport.subscriber import Subscriber
from tests.conftest import wait_until

WAIT_S = 5.0  # longest any single wait in these tests
QUIET_S = 0.5  # how long "receives nothing" is watched for, after the refusal was seen
FAST = Timing(stats_interval_s=0.2, drain_timeout_s=1.0, exit_timeout_s=3.0, ready_timeout_s=20.0)
TOPIC = topic_for("cam", "video")
MARKER = b"plaintext-on-the-wire:" * 64  # a payload an eavesdropper would recognise
log = logging.getLogger("test.security")


# -- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture
def cluster(cluster_keys: Credentials) -> Credentials:
    """The keys of cluster `lab` (conftest's `cluster_keys`), named for what these tests call them."""
    return cluster_keys


@pytest.fixture
def contexts() -> Iterator[Callable[[], zmq.Context[Any]]]:
    """New ZeroMQ contexts (a secured publisher runs its context's gatekeeper), destroyed at the end."""
    made: list[zmq.Context[Any]] = []

    def make() -> zmq.Context[Any]:
        made.append(zmq.Context())
        return made[-1]

    yield make
    for context in made:
        context.destroy(linger=0)


def _until(condition: Callable[[], bool], pump: Callable[[], None] | None = None, timeout_s: float = WAIT_S) -> None:
    wait_until(condition, pump, timeout_s)


def _receive(sub: Subscriber) -> Any:
    found: list[Any] = []

    def got() -> bool:
        sample = sub.receive()
        if sample is not None:
            found.append(sample.value)
        return bool(found)

    _until(got)
    return found[0]


class Stranger:
    """A SUB socket with someone else's keys (or none), watched from before it connects."""

    def __init__(self, context: zmq.Context[Any], endpoint: str, security: DataSecurity | None,
                 topic: bytes = TOPIC) -> None:
        self.socket: zmq.Socket[Any] = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        if security is not None:
            security.connect_to(self.socket)
        self._watch = HandshakeWatch(self.socket)  # before connecting: a refused protocol is not retried
        self.socket.connect(endpoint)

    def refused(self, pump: Callable[[], None]) -> str:
        """Wait until the publisher refused the handshake; the refusal kind ("auth" or "keys")."""
        result: list[str] = []

        def refused() -> bool:
            kind = self._watch.check()
            assert not self._watch.succeeded, "a stranger's handshake succeeded"
            if kind:
                result.append(kind)
            return bool(result)

        _until(refused, pump)
        return result[0]

    def receives_nothing(self, pump: Callable[[], None]) -> None:
        deadline = time.monotonic() + QUIET_S
        while time.monotonic() < deadline:  # bounded: watched for QUIET_S
            pump()
            assert not self.socket.poll(10), "a stranger received data"

    def close(self) -> None:
        self._watch.close()
        self.socket.close(linger=0)


class Relay:
    """A TCP relay between a subscriber and a publisher keeping what the publisher sent: an eavesdropper's view."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self._upstream_address = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self.seen = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if not select.select([self._listener], [], [], WAIT_S)[0]:
            return
        down, _ = self._listener.accept()
        up = socket.create_connection(self._upstream_address, timeout=WAIT_S)
        try:
            while not self._stop.is_set():
                for ready in select.select([down, up], [], [], 0.05)[0]:
                    data = ready.recv(1 << 20)
                    if not data:
                        return
                    if ready is up:
                        self.seen += data
                    (down if ready is up else up).sendall(data)
        finally:
            down.close()
            up.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self._listener.close()


def _zmtp1_subscriber(endpoint: str, topics: list[bytes]) -> socket.socket:
    """A stranger that skips the handshake: a ZMTP/1.0 peer (no greeting, no mechanism) sending subscriptions."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=WAIT_S)
    message = b"\x01\x00"  # an empty identity frame: the whole 1.0 "greeting"
    for topic in topics:
        body = b"\x01" + topic  # subscribe
        message += bytes([len(body) + 1, 0]) + body
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # hung up on already: what a secured one does
        raw.sendall(message)
    return raw


def _closed_by_peer(raw: socket.socket) -> bool:
    """Whether the other end closed (its greeting, sent before it knew ours, may come first)."""
    if not select.select([raw], [], [], 0.05)[0]:
        return False
    try:
        return raw.recv(1 << 16) == b""
    except ConnectionResetError:
        return True


# -- members exchange data ------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypt", [True, False], ids=["curve", "plain"])
def test_members_exchange_arrays_and_only_plain_is_readable_on_the_wire(
        encrypt: bool, cluster: Credentials, contexts: Callable[[], zmq.Context[Any]]) -> None:
    sec = DataSecurity(cluster, encrypt, "session-1")
    pub = Publisher(contexts(), "cam", ["video"], security=sec)
    relay = Relay(pub.endpoint)
    sub = Subscriber(contexts(), "cam", relay.endpoint, TOPIC, log, security=sec)
    try:
        assert pub.socket.getsockopt(zmq.MECHANISM) == (zmq.CURVE if encrypt else zmq.PLAIN)
        _until(lambda: pub.subscribers("video") == 1, pub.handle_subscriptions)
        frame = np.arange(240 * 320 * 3, dtype=np.uint8).reshape(240, 320, 3)
        pub.publish("video", frame, 1)
        assert np.array_equal(_receive(sub), frame)
        marked = np.frombuffer(MARKER, dtype=np.uint8)
        pub.publish("video", marked, 2)
        assert _receive(sub).tobytes() == MARKER
        pub.publish("video", {"row": 3}, 3)
        assert _receive(sub) == {"row": 3}
        assert (MARKER in relay.seen) is not encrypt, "Curve let the payload cross readable" if encrypt else \
            "the relay saw no PLAIN traffic: the test would prove nothing"
    finally:
        sub.close()
        relay.close()
        pub.close()


def test_insecure_credentials_mean_no_gatekeeper_and_null_sockets(contexts: Callable[[], zmq.Context[Any]]) -> None:
    sec = DataSecurity(Credentials.demo("lab"), True, "s")
    pub = Publisher(contexts(), "cam", ["video"], security=sec)
    sub = Subscriber(contexts(), "cam", pub.endpoint, TOPIC, log)  # no keys at all: let in
    try:
        assert pub.socket.getsockopt(zmq.MECHANISM) == zmq.NULL
        _until(lambda: pub.subscribers("video") == 1, pub.handle_subscriptions)
        pub.publish("video", {"ok": True}, 1)
        assert _receive(sub) == {"ok": True}
    finally:
        sub.close()
        pub.close()


def test_one_secured_publisher_per_context(cluster: Credentials, contexts: Callable[[], zmq.Context[Any]]) -> None:
    context = contexts()
    sec = DataSecurity(cluster, True, "s")
    first = Publisher(context, "a", ["out"], security=sec)
    try:
        with pytest.raises(TransportError, match="node b: cannot start the gatekeeper") as caught:
            Publisher(context, "b", ["out"], security=sec)
        assert "one secured publisher" in str(caught.value)
    finally:
        first.close()


# -- strangers get nothing ------------------------------------------------------------------------------


def _stranger(kind: str, cluster: Credentials) -> DataSecurity | None:
    if kind == "null":
        return None
    if kind == "other_cluster":
        other = keys.manager_keys("other", create=True)
        assert other is not None
        return DataSecurity(Credentials("lab", other.manager_public, other.secret), True, "session-1")
    if kind == "plain_other_session":
        return DataSecurity(cluster, False, "session-2")
    if kind == "plain_against_curve":
        return DataSecurity(cluster, False, "session-1")
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "encrypt", "refusal"), [
    ("null", True, "keys"),
    ("null", False, "keys"),
    ("other_cluster", True, "keys"),
    ("plain_other_session", False, "auth"),  # reaches the gatekeeper: the wrong password is refused there
    ("plain_against_curve", True, "keys"),
])
def test_a_stranger_receives_nothing_while_a_member_keeps_receiving(
        kind: str, encrypt: bool, refusal: str, cluster: Credentials,
        contexts: Callable[[], zmq.Context[Any]]) -> None:
    sec = DataSecurity(cluster, encrypt, "session-1")
    pub = Publisher(contexts(), "cam", ["video"], security=sec)
    sub_context = contexts()
    stranger = Stranger(sub_context, pub.endpoint, _stranger(kind, cluster))
    member = Subscriber(sub_context, "cam", pub.endpoint, TOPIC, log, security=sec)
    try:
        _until(lambda: pub.subscribers("video") >= 1, pub.handle_subscriptions)
        assert stranger.refused(pub.handle_subscriptions) == refusal
        assert pub.subscribers("video") == 1, "the stranger counts as a subscriber"
        for i in range(5):
            pub.publish("video", np.full((64, 64), i, np.uint8), i)
            assert int(_receive(member)[0, 0]) == i
        stranger.receives_nothing(pub.handle_subscriptions)
        assert member.dropped == 0
    finally:
        stranger.close()
        member.close()
        pub.close()


def test_a_rotated_out_member_is_refused(cluster: Credentials, contexts: Callable[[], zmq.Context[Any]]) -> None:
    rotated = keys.rotate("lab")  # the old secret is what a worker with the old token still holds
    pub = Publisher(contexts(), "cam", ["video"], security=DataSecurity(rotated, True, "s"))
    sub_context = contexts()
    old = Stranger(sub_context, pub.endpoint, DataSecurity(cluster, True, "s"))
    member = Subscriber(sub_context, "cam", pub.endpoint, TOPIC, log, security=DataSecurity(rotated, True, "s"))
    try:
        _until(lambda: pub.subscribers("video") >= 1, pub.handle_subscriptions)
        assert old.refused(pub.handle_subscriptions) == "keys"
        pub.publish("video", {"n": 1}, 1)
        assert _receive(member) == {"n": 1}
        old.receives_nothing(pub.handle_subscriptions)
        assert pub.subscribers("video") == 1
    finally:
        old.close()
        member.close()
        pub.close()


@pytest.mark.parametrize("secured", [False, True], ids=["no_keys", "keys"])
def test_a_stranger_skipping_the_handshake_cannot_subscribe(
        secured: bool, cluster: Credentials, contexts: Callable[[], zmq.Context[Any]]) -> None:
    """Without keys a ZMTP/1.0 peer's bare subscriptions count (which is why the control test is here);
    with keys the publisher drops the connection before reading any, data topics and previews alike."""
    sec = DataSecurity(cluster, True, "s") if secured else None
    pub = Publisher(contexts(), "cam", ["video"], security=sec)
    raw: socket.socket | None = None
    try:
        raw = _zmtp1_subscriber(pub.endpoint, [TOPIC, b"@" + TOPIC, b"~" + TOPIC])
        if not secured:  # the data topic counts; "@" + topic is no topic of ours (same-host readers use a Unix socket)
            _until(lambda: pub._subscribers.get(b"~" + TOPIC) == 1, pub.handle_subscriptions)  # noqa: SLF001
            assert pub.subscribers("video") == 1
            return
        _until(lambda: _closed_by_peer(raw))
        pub.handle_subscriptions()
        assert pub.subscribers("video") == 0
        assert pub._subscribers == {}  # noqa: SLF001 - no preview topic either: nothing a stranger can switch on
    finally:
        if raw is not None:
            raw.close()
        pub.close()


# -- previews for cp monitor ----------------------------------------------------------------------------


def _preview_subscribers(pub: Publisher) -> int:
    pub.handle_subscriptions()
    return pub._subscribers.get(b"~" + TOPIC, 0)  # noqa: SLF001 - what offer_preview acts on


@pytest.mark.parametrize("encrypt", [True, False], ids=["curve", "plain"])
def test_preview_feed_with_the_session_security_gets_previews_and_one_without_does_not(
        encrypt: bool, cluster: Credentials, contexts: Callable[[], zmq.Context[Any]]) -> None:
    sec = DataSecurity(cluster, encrypt, "session-1")
    pub = Publisher(contexts(), "cam", ["video"], security=sec)
    member, stranger = PreviewFeed(sec), PreviewFeed()
    try:
        stranger.watch({pub.endpoint: [("cam", "video")]})
        member.watch({pub.endpoint: [("cam", "video")]})
        _until(lambda: _preview_subscribers(pub) == 1)
        pub.offer_preview("video", np.zeros((480, 640, 3), np.uint8), 0)
        got: list[Any] = []

        def previewed() -> bool:
            got.extend(member.poll(0.05)[0])
            return bool(got)

        _until(previewed)
        assert got[0][:2] == ("cam", "video") and got[0][2].shape[1] <= 64
        assert stranger.poll(QUIET_S)[0] == [] and _preview_subscribers(pub) == 1
    finally:
        member.close()
        stranger.close()
        pub.close()


# -- the driver reads its security from the environment ----------------------------------------------------


@pytest.mark.parametrize("public", [b"", b":", b"a:b:"], ids=["any", "colon", "colons"])
def test_security_travels_in_the_environment_and_the_reader_removes_it(cluster: Credentials, public: bytes) -> None:
    # ':' is a Z85 digit: a manager key with some in it must survive the trip (4 keys in 10 have one)
    creds = Credentials("lab", public + cluster.manager_public[len(public):], cluster.secret)
    sec = DataSecurity(creds, False, "session-1")
    env = {"PATH": "/bin", security.DATA_SECURITY_ENV: "stale from a parent"}
    security.give(env, None)
    assert security.DATA_SECURITY_ENV not in env  # an unsecured session inherits nothing
    security.give(env, sec)
    assert security.take(env) == sec and security.DATA_SECURITY_ENV not in env
    security.give(env, DataSecurity(cluster, True, "s"))
    taken = security.take(env)
    assert taken is not None and taken.credentials.manager_secret is None  # the manager's own key stays home
    security.give(env, DataSecurity(Credentials.demo("lab"), True, "s"))
    assert security.take(env) == DataSecurity(Credentials.demo("lab"), True, "s")
    assert security.take(env) is None
    env[security.DATA_SECURITY_ENV] = f"1:s:curve:lab:{cluster.manager_public.decode()}:not-hex-{cluster.secret.hex()}"
    with pytest.raises(TransportError) as caught:
        security.take(env)
    assert cluster.secret.hex() not in str(caught.value) and "CP_DATA_SECURITY is malformed" in str(caught.value)


RECIPE = """
name: secured
nodes:
  src: {type: pattern, params: {width: 320, height: 240, rate_hz: 50}}
  sink: {type: verify, inputs: [src], sync: all}
"""


@pytest.mark.parametrize("encrypt", [True, False], ids=["curve", "plain"])
def test_supervised_nodes_take_the_session_security_from_their_environment(
        encrypt: bool, cluster: Credentials, registry: Registry, tmp_path: Path,
        contexts: Callable[[], zmq.Context[Any]]) -> None:
    """Node processes serve and subscribe with the keys their supervisor gave them (the same-host
    shared-memory path included); a member outside reads the stream, a program without keys does not."""
    sec = DataSecurity(cluster, encrypt, "session-1")
    recipe = parse_recipe(RECIPE, registry)
    supervisor = Supervisor(plan_nodes(recipe, registry), tmp_path / "session", "lab", FAST, data_security=sec)
    watcher_context = contexts()
    with supervisor:
        supervisor.start()
        assert security.DATA_SECURITY_ENV not in os.environ  # only in the children's environment
        _until(lambda: supervisor.all_ready or bool(supervisor.failures), lambda: supervisor.poll(20),
               FAST.ready_timeout_s)  # two Python processes starting on a busy machine
        assert not supervisor.failures, supervisor.failures
        supervisor.begin(Clock().now_ns())
        endpoint = supervisor.bound["src"].endpoint
        stranger = Stranger(watcher_context, endpoint, None, topic_for("src", "video"))
        member = Subscriber(watcher_context, "w", endpoint, topic_for("src", "video"), log, security=sec)
        try:
            assert _receive(member).shape == (240, 320, 3)
            stranger.refused(lambda: supervisor.poll(0))
            stranger.receives_nothing(lambda: supervisor.poll(0))
        finally:
            member.close()
            stranger.close()
        supervisor.stop()
        supervisor.wait_finished(10)
        nodes = supervisor.nodes
    assert {n: s.state for n, s in nodes.items()} == {"src": NodeState.DONE, "sink": NodeState.DONE}
    sent, sink = nodes["src"].stats.samples_out, nodes["sink"].stats
    assert sent > 0 and sink.samples_in == {"src": sent} and sink.dropped_in == {"src": 0}


# -- the recipe says whether data is encrypted --------------------------------------------------------------


def test_encrypt_data_is_on_unless_the_recipe_says_false(registry: Registry) -> None:
    text = "name: r\nencrypt_data: {}\nnodes:\n  a: {{type: test_video}}\n"
    assert parse_recipe("name: r\nnodes:\n  a: {type: test_video}\n", registry).encrypt_data is True
    assert parse_recipe(text.format("false"), registry).encrypt_data is False
    assert parse_recipe(text.format("true"), registry).encrypt_data is True
    assert RunOptions().encrypt_data is True


@pytest.mark.parametrize(("value", "got"), [('"no"', "str 'no'"), ("0", "int 0"), ("[false]", "a list"),
                                            ("", "nothing")])
def test_encrypt_data_must_be_true_or_false(registry: Registry, value: str, got: str) -> None:
    text = f"name: r\nencrypt_data: {value}\nnodes:\n  a: {{type: test_video}}\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, registry, source="demo.yaml")
    assert caught.value.problems == [f"demo.yaml:2: encrypt_data must be true or false, got {got}"]
