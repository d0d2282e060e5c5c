"""Manager discovery over mDNS, between real processes on the hosts of a namespace lab."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict
from typing import Any

import pytest

from cpcli.cluster.discovery import Advertiser, ManagerAdvert, find_manager, interface_for
from cpcli.errors import TransportError
from cpcli.transport.protocol import PROTOCOL_VERSION
from tests.lab import Lab, lab, need_root, read_line

__all__ = ["lab"]  # the fixture, imported for the tests below

READY_TIMEOUT_S = 6.0  # an advertiser probes for about 1.5 s before it announces
FIND_SLACK_S = 4.0  # beyond a search's own bound: interpreter start, imports, teardown
NOT_HERE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never an address of this machine

# Each runs as `python -c` inside a lab host and speaks JSON lines on stdout.
ADVERTISE = """
import json, sys
from cpcli.cluster.discovery import Advertiser, ManagerAdvert
from cpcli.errors import CpError
try:
    advertiser = Advertiser(ManagerAdvert(**json.loads(sys.argv[1])), sys.argv[2])
    advertiser.start()
except CpError as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err)}), flush=True)
    sys.exit(1)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()  # until the test says stop
advertiser.stop()
advertiser.stop()  # idempotent
print(json.dumps({"stopped": True}), flush=True)
"""
FIND = """
import json, logging, sys, time
from dataclasses import asdict
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
from cpcli.cluster.discovery import find_manager, find_managers
from cpcli.errors import CpError
how, interface, timeout_s, cluster = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] or None
options = json.loads(sys.argv[5])  # keyword arguments, and "go": wait for a line on stdin first
if options.pop("go", False):
    print(json.dumps({"waiting": True}), flush=True)
    sys.stdin.readline()
started = time.monotonic()
try:
    if how == "one":
        out = {"found": [asdict(find_manager(interface, timeout_s, cluster, **options))]}
    else:
        out = {"found": [asdict(a) for a in find_managers(interface, timeout_s, cluster, **options)]}
except CpError as err:
    out = {"error": type(err).__name__, "message": err.message, "hint": err.hint}
out["elapsed_s"] = time.monotonic() - started
print(json.dumps(out), flush=True)
"""


# Asks for _cpcli._tcp.local. PTR as a browser does (QM, from port 5353) and says when each of argv[2]
# managers' multicast answers is heard: they then multicast their records, so for a second they may not again.
ASK = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("", 5353))
ip = socket.inet_aton(sys.argv[1])
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("224.0.0.251") + ip)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, ip)
s.sendto(struct.pack(">6H", 0, 0, 1, 0, 0, 0) + b"\\x06_cpcli\\x04_tcp\\x05local\\x00" + struct.pack(">2H", 12, 1),
         ("224.0.0.251", 5353))
s.settimeout(0.1)
heard = set()
deadline = time.monotonic() + 3.0
while time.monotonic() < deadline and len(heard) < int(sys.argv[2]):
    try:
        data, sender = s.recvfrom(9000)
    except TimeoutError:
        continue
    if len(data) > 2 and data[2] & 0x80 and b"_cpcli" in data and sender[0] not in heard:  # a response (QR)
        heard.add(sender[0])
        print("heard", sender[0], flush=True)
"""
# A responder that answers one-shot queries (from a port other than 5353) only, and only with what a
# search must ignore: garbage, an answer with another id, one from another port, one for an address
# outside the network (that one reaches the search's ignored list).
FAKE = """
import socket, sys, time
from zeroconf import DNSIncoming, DNSOutgoing, ServiceInfo
ip = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("224.0.0.251") + socket.inet_aton(ip))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.bind((ip, 0))

def answer(query, query_id, name, host):
    info = ServiceInfo("_cpcli._tcp.local.", f"{name}@lab-a._cpcli._tcp.local.", port=5555,
                       properties={"cluster": "lab-a", "name": name, "protocol": sys.argv[2], "key": ""},
                       server=f"fake-{name}.local.", parsed_addresses=[host])
    out = DNSOutgoing(0x8400, False, query_id)  # a response, authoritative, as to a one-shot query
    for question in query.questions:
        out.add_question(question)
    out.add_answer_at_time(info.dns_pointer(), 0)
    for record in (info.dns_service(), info.dns_text(), *info.dns_addresses()):
        out.add_additional_answer(record)
    return out.packets()[0]

print("listening", flush=True)
s.settimeout(0.1)
deadline = time.monotonic() + 10.0
while time.monotonic() < deadline:
    try:
        data, (addr, port) = s.recvfrom(9000)
    except TimeoutError:
        continue
    query = DNSIncoming(data)
    if port == 5353 or not query.valid or not query.is_query() or b"_cpcli" not in data:
        continue
    s.sendto(b"\\x00garbage", (addr, port))
    s.sendto(answer(query, query.id ^ 1, "wrong-id", ip), (addr, port))
    other.sendto(answer(query, query.id, "wrong-port", ip), (addr, port))
    s.sendto(answer(query, query.id, "far", "192.0.2.1"), (addr, port))
"""


def advertise(lab: Lab, host: int, *, cluster: str = "lab-a", name: str = "m1", port: int = 5555,
              protocol: int = PROTOCOL_VERSION, interface: str | None = None, wait: bool = True
              ) -> subprocess.Popen[bytes]:
    """A manager advert in `host`, on its bridge address unless `interface` says otherwise; `wait`: announced."""
    ip = interface or lab.ip(host)
    advert = ManagerAdvert(cluster=cluster, name=name, host=ip, port=port, protocol=protocol)
    proc = lab.python(host, ADVERTISE, [json.dumps(asdict(advert)), ip], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        ready(proc)
    return proc


def ready(*procs: subprocess.Popen[bytes]) -> None:
    """Wait for advertisers started together (they probe for about 1.5 s at the same time) to announce."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for proc in procs:
        reply = json.loads(read_line(proc, max(0.1, deadline - time.monotonic())))
        assert reply == {"ready": True}, reply


def stop(*procs: subprocess.Popen[bytes]) -> None:
    """Ask advertisers to stop, all at once, and check that each says so and exits cleanly."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
    deadline = time.monotonic() + 3.0
    for proc in procs:
        assert json.loads(read_line(proc, max(0.1, deadline - time.monotonic()))) == {"stopped": True}
        assert proc.wait(max(0.1, deadline - time.monotonic())) == 0


def start_find(lab: Lab, host: int, timeout_s: float, cluster: str = "", *, how: str = "one",
               interface: str | None = None, go: bool = False, **options: Any) -> subprocess.Popen[str]:
    """Start a search (`how` = one: find_manager, all: find_managers) in `host`, on its bridge address.

    `options` are passed on (settle_s=None: browse the whole timeout_s); `go`: the search starts, imports done,
    only when `go()` says so.
    """
    args = [how, interface or lab.ip(host), str(timeout_s), cluster, json.dumps({"go": go, **options})]
    proc = lab.python(host, FIND, args, stdin=subprocess.PIPE if go else subprocess.DEVNULL,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if go:
        assert json.loads(read_line(proc, READY_TIMEOUT_S)) == {"waiting": True}
    return proc


def go(*searches: subprocess.Popen[str]) -> None:
    """Start searches made with `start_find(go=True)`, all at once."""
    for search in searches:
        assert search.stdin is not None
        search.stdin.write("go\n")
        search.stdin.flush()


def result(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """The JSON a search printed; its log lines land in `log`."""
    out, err = proc.communicate(timeout=timeout_s + FIND_SLACK_S)
    assert proc.returncode == 0 and out, f"search failed ({proc.returncode}):\n{out}\n{err}"
    reply: dict[str, Any] = json.loads(out)
    reply["log"] = err
    return reply


def find(lab: Lab, host: int, timeout_s: float, cluster: str = "", **kw: Any) -> dict[str, Any]:
    return result(start_find(lab, host, timeout_s, cluster, **kw), timeout_s)


def error_of(reply: dict[str, Any]) -> dict[str, Any]:
    return {key: reply.get(key) for key in ("error", "message", "hint")}


def advert_of(lab: Lab, host: int, cluster: str = "lab-a", name: str = "m1") -> dict[str, Any]:
    return {"cluster": cluster, "name": name, "host": lab.ip(host), "port": 5555, "protocol": PROTOCOL_VERSION,
            "key": ""}


# The lab itself


def test_lab_builds_fast_carries_mdns_multicast_and_cuts_a_link(lab: Lab) -> None:
    assert lab.build_s < 2.0, f"lab took {lab.build_s:.2f} s to build"
    listen = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
group = socket.inet_aton("224.0.0.251") + socket.inet_aton(sys.argv[1])
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
s.settimeout(0.2)
print("listening", flush=True)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        print(s.recv(100).decode(), flush=True)
    except TimeoutError:
        pass
"""
    send = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
for i in range(10):
    s.sendto(f"{sys.argv[2]}-{i}".encode(), ("224.0.0.251", 5353))
    time.sleep(0.03)
"""
    receiver = lab.python(1, listen, [lab.ip(1)], stdout=subprocess.PIPE)
    assert read_line(receiver, 5.0) == "listening"
    assert lab.call_python(2, send, [lab.ip(2), "before"], timeout_s=5.0).returncode == 0
    assert read_line(receiver, 2.0).startswith("before-")
    lab.link_down(1)
    assert lab.call_python(2, send, [lab.ip(2), "down"], timeout_s=5.0).returncode == 0
    lab.link_up(1)
    assert lab.call_python(2, send, [lab.ip(2), "after"], timeout_s=5.0).returncode == 0
    lines = [read_line(receiver, 2.0) for _ in range(10)]  # the rest of "before", then "after"
    assert not any(line.startswith("down-") for line in lines), lines
    assert lines[-1].startswith("after-"), lines


def test_lab_tears_down_every_namespace_and_process() -> None:
    need_root()
    with Lab(hosts=3) as built:
        proc = built.run(2, ["sleep", "30"])
        names = [h.netns for h in built.hosts] + [built.bridge_netns]
    assert proc.poll() is not None
    assert built.teardown_s < 2.0, f"lab took {built.teardown_s:.2f} s to tear down"
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not [n for n in names if n in left.split()]


# Discovery


def test_worker_finds_the_manager_with_no_address_given(lab: Lab) -> None:
    manager = advertise(lab, 1)
    reply = find(lab, 2, 3.0)
    assert reply["found"] == [advert_of(lab, 1)]
    assert reply["elapsed_s"] < 3.0
    stop(manager)


def test_worker_started_first_finds_a_manager_that_comes_up_while_it_looks(lab: Lab) -> None:
    search = start_find(lab, 2, 5.0)
    manager = advertise(lab, 1)
    reply = result(search, 5.0)
    assert reply["found"] == [advert_of(lab, 1)]
    stop(manager)


def test_two_clusters_on_one_lan_do_not_mix(lab: Lab) -> None:
    lab.add_host()
    lab.add_host()
    managers = [advertise(lab, 1, cluster="lab-a", wait=False), advertise(lab, 3, cluster="lab-b", wait=False),
                advertise(lab, 4, cluster="lab-b", name="m2", wait=False)]
    ready(*managers)
    searches = {cluster or how: start_find(lab, 2, 3.0, cluster, how=how)
                for cluster, how in (("lab-a", "one"), ("lab-b", "one"), ("", "one"), ("", "all"), ("lab-c", "one"))}
    replies = {what: result(search, 3.0) for what, search in searches.items()}
    everyone = "m1 of cluster lab-a at 198.18.0.1:5555, m1 of cluster lab-b at 198.18.0.3:5555, " \
               "m2 of cluster lab-b at 198.18.0.4:5555"
    assert replies["lab-a"]["found"] == [advert_of(lab, 1, "lab-a")]
    assert replies["all"]["found"] == [advert_of(lab, 1, "lab-a"), advert_of(lab, 3, "lab-b"),
                                       advert_of(lab, 4, "lab-b", "m2")]
    assert error_of(replies["one"]) == {
        "error": "TransportError", "message": f"3 managers found on 198.18.0.2: {everyone}",
        "hint": "pass --cluster NAME or --manager HOST:PORT"}
    assert error_of(replies["lab-b"]) == {
        "error": "TransportError",
        "message": "2 managers of cluster lab-b found on 198.18.0.2: m1 of cluster lab-b at 198.18.0.3:5555, "
                   "m2 of cluster lab-b at 198.18.0.4:5555",
        "hint": "give the managers different --cluster names, or pass --manager HOST:PORT"}
    assert error_of(replies["lab-c"]) == {
        "error": "PeerLostError", "message": f"no cpcli manager of cluster lab-c found on 198.18.0.2 within 3 s; "
                                             f"ignored: {everyone}",
        "hint": "is `cp manager --cluster lab-c` running on this network? or pass --manager HOST:PORT"}
    stop(*managers)


def test_a_manager_that_just_multicast_its_answer_is_found_at_once(lab: Lab) -> None:
    # RFC 6762 section 14: a record multicast within the last second is not multicast again before the
    # second is up, so a browser asking now hears the manager a second later; a one-shot query, at once.
    lab.add_host()
    manager = advertise(lab, 1)
    search = start_find(lab, 2, 0.5, how="all", settle_s=None, go=True)
    asker = lab.python(3, ASK, [lab.ip(3), "1"], stdout=subprocess.PIPE)
    assert read_line(asker, 3.0) == "heard 198.18.0.1"
    go(search)
    assert result(search, 0.5)["found"] == [advert_of(lab, 1)]
    stop(manager)


def test_managers_of_two_clusters_that_just_multicast_are_found_at_once_and_told_apart(lab: Lab) -> None:
    lab.add_host()
    lab.add_host()
    managers = [advertise(lab, 1, cluster="lab-a", wait=False), advertise(lab, 3, cluster="lab-b", wait=False)]
    ready(*managers)
    searches = {"all": start_find(lab, 2, 0.5, how="all", settle_s=None, go=True),
                "lab-a": start_find(lab, 2, 0.5, "lab-a", settle_s=0.25, go=True),
                "lab-c": start_find(lab, 2, 0.5, "lab-c", settle_s=0.25, go=True)}
    asker = lab.python(4, ASK, [lab.ip(4), "2"], stdout=subprocess.PIPE)
    assert {read_line(asker, 3.0), read_line(asker, 3.0)} == {"heard 198.18.0.1", "heard 198.18.0.3"}
    go(*searches.values())
    replies = {what: result(search, 0.5) for what, search in searches.items()}
    assert replies["all"]["found"] == [advert_of(lab, 1, "lab-a"), advert_of(lab, 3, "lab-b")]
    assert replies["lab-a"]["found"] == [advert_of(lab, 1, "lab-a")]
    assert replies["lab-c"]["message"] == ("no cpcli manager of cluster lab-c found on 198.18.0.2 within 0.5 s; "
                                           "ignored: m1 of cluster lab-a at 198.18.0.1:5555, "
                                           "m1 of cluster lab-b at 198.18.0.3:5555")
    stop(*managers)


def test_answers_to_one_shot_queries_are_checked_like_multicast_ones(lab: Lab) -> None:
    lab.add_host()
    manager = advertise(lab, 1)
    fake = lab.python(3, FAKE, [lab.ip(3), str(PROTOCOL_VERSION)], stdout=subprocess.PIPE)
    assert read_line(fake, 5.0) == "listening"
    searches = {cluster: start_find(lab, 2, 1.0, cluster) for cluster in ("lab-a", "lab-b")}
    replies = {cluster: result(search, 1.0) for cluster, search in searches.items()}
    assert replies["lab-a"]["found"] == [advert_of(lab, 1)]  # not wrong-id nor wrong-port of 198.18.0.3
    assert replies["lab-b"]["message"] == (
        "no cpcli manager of cluster lab-b found on 198.18.0.2 within 1 s; ignored: far of cluster lab-a at "
        "192.0.2.1:5555 (outside 198.18.0.0/24, the network of this interface), m1 of cluster lab-a at 198.18.0.1:5555")
    stop(manager)


def test_nothing_found_is_a_clear_error_within_the_timeout(lab: Lab) -> None:
    reply = find(lab, 2, 1.5)
    assert reply["error"] == "PeerLostError"
    assert reply["message"] == "no cpcli manager found on 198.18.0.2 within 1.5 s"
    assert reply["hint"] == "is `cp manager` running on this network? or pass --manager HOST:PORT"
    assert 1.5 <= reply["elapsed_s"] < 2.0


def test_an_advert_stays_on_its_own_interface(lab: Lab) -> None:
    off_bridge = lab.add_host(attached=False)
    on_bridge = advertise(lab, 1, wait=False)
    on_loopback = advertise(lab, 2, name="m2", interface="127.0.0.1", wait=False)
    ready(on_bridge, on_loopback)
    searches = {
        "off bridge": start_find(lab, off_bridge.index, 2.0, how="all", interface="127.0.0.1"),
        "h1 loopback": start_find(lab, 1, 2.0, how="all", interface="127.0.0.1"),  # h1's own eth0 advert
        "h2 eth0": start_find(lab, 2, 2.0, how="all"),  # h2's own loopback advert
        "h2 loopback": start_find(lab, 2, 2.0, how="all", interface="127.0.0.1"),
    }
    replies = {where: result(search, 2.0)["found"] for where, search in searches.items()}
    assert replies == {"off bridge": [], "h1 loopback": [], "h2 eth0": [advert_of(lab, 1)],
                       "h2 loopback": [{**advert_of(lab, 2, name="m2"), "host": "127.0.0.1"}]}
    stop(on_bridge, on_loopback)


def test_a_manager_of_another_protocol_version_is_ignored_and_logged(lab: Lab) -> None:
    lab.add_host()
    old = advertise(lab, 1, name="old", protocol=PROTOCOL_VERSION + 1, wait=False)
    current = advertise(lab, 3, name="current", wait=False)
    ready(old, current)
    reply = find(lab, 2, 3.0)
    assert reply["found"] == [advert_of(lab, 3, name="current")]
    assert (f"WARNING cpcli.cluster.discovery ignoring manager old of cluster lab-a at 198.18.0.1:5555: it speaks "
            f"protocol {PROTOCOL_VERSION + 1}, this cpcli speaks {PROTOCOL_VERSION}") in reply["log"]
    stop(current)
    reply = find(lab, 2, 1.5)
    assert reply["error"] == "PeerLostError"
    assert f"ignored: old of cluster lab-a at 198.18.0.1:5555 (protocol {PROTOCOL_VERSION + 1}" in reply["message"]
    stop(old)


def test_a_second_manager_with_the_same_name_in_a_cluster_is_refused(lab: Lab) -> None:
    lab.add_host()
    lab.add_host()
    first = advertise(lab, 1)
    second = advertise(lab, 3, wait=False)
    other_cluster = advertise(lab, 4, cluster="lab-b", wait=False)  # same name, another cluster: fine
    ready(other_cluster)
    reply = json.loads(read_line(second, READY_TIMEOUT_S))
    assert reply == {"error": "TransportError", "message": (
        "a manager named m1 of cluster lab-a is already advertised on the network of 198.18.0.3 (198.18.0.1:5555); "
        "give this one another --name, or another --cluster")}
    assert second.wait(3.0) == 1
    assert find(lab, 2, 3.0, "lab-a")["found"] == [advert_of(lab, 1)]
    stop(first, other_cluster)


def test_a_stopped_manager_is_gone_from_a_fresh_search(lab: Lab) -> None:
    manager = advertise(lab, 1)
    assert find(lab, 2, 3.0)["found"] == [advert_of(lab, 1)]
    stopped = time.monotonic()
    stop(manager)
    assert time.monotonic() - stopped < 2.0
    assert find(lab, 2, 2.0, how="all")["found"] == []


# Checks made before any packet is sent (no mDNS runs in these)


def test_interface_for_names_the_interface_of_a_local_address() -> None:
    assert interface_for("127.0.0.1") == "lo"


@pytest.mark.parametrize("ip, says", [
    (NOT_HERE, f"{NOT_HERE} is not an address of this machine; its IPv4 addresses: "),
    ("lab-02", "interface 'lab-02' is not an IPv4 address"),
    ("::1", "interface '::1' is not an IPv4 address"),
    ("0.0.0.0", "interface 0.0.0.0 is not the address of one interface"),
])
def test_interface_for_rejects_what_is_not_an_address_of_this_machine(ip: str, says: str) -> None:
    with pytest.raises(TransportError) as caught:
        interface_for(ip)
    assert caught.value.message.startswith(says)
    assert caught.value.hint


def test_discovery_refuses_an_interface_that_is_not_here_before_starting_mdns() -> None:
    with pytest.raises(TransportError, match=f"{NOT_HERE} is not an address of this machine"):
        find_manager(NOT_HERE, 1.0)
    advertiser = Advertiser(ManagerAdvert(cluster="lab-a", name="m1", host=NOT_HERE, port=5555), NOT_HERE)
    with pytest.raises(TransportError, match=f"{NOT_HERE} is not an address of this machine"):
        advertiser.start()
    advertiser.stop()  # harmless when it never started


def test_an_advert_with_bad_fields_is_refused_listing_every_problem() -> None:
    with pytest.raises(TransportError) as caught:
        Advertiser(ManagerAdvert(cluster="lab a", name="", host="198.18.0.1", port=0), "198.18.0.2")
    assert caught.value.message == (
        "cannot advertise manager '': cluster 'lab a' must be 1-30 letters, digits, '.', '_' or '-', starting with "
        "a letter or digit; name '' must be 1-30 letters, digits, '.', '_' or '-', starting with a letter or digit; "
        "port 0 is not a TCP port; host 198.18.0.1 is not the interface 198.18.0.2 it is advertised on")
