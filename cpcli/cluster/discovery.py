"""Manager discovery over mDNS (zeroconf): advertising a manager and finding it, on one interface only.

Zeroconf joins the mDNS group on the given address only and sends only from it. Its shared listener
(0.0.0.0:5353, SO_REUSEPORT) may still hear multicast from other interfaces of this machine where
another program joined the group, so a search also drops adverts whose address lies outside the
interface's network. IP_MULTICAST_ALL=0 would stop that hearing at the socket, but with SO_REUSEPORT
Linux (seen on 6.18) then hands a packet to the wrong member of the port's group when only one of
them joined its interface: two programs on different interfaces of one machine miss each other's
traffic. So it is left alone.

A search also asks by "one-shot" queries (RFC 6762 sections 5.1 and 6.7) from a UDP port of its own: a
responder answers those by unicast to that port at once, while it multicasts a record at most once a
second (section 14), so a worker asking just after another one would otherwise hear the manager a second
or more later than that one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import queue
import random
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import psutil
from zeroconf import (  # type: ignore[attr-defined]  # DNSIncoming, DNSOutgoing, DNSQuestion are not in __all__
    DNSIncoming,
    DNSOutgoing,
    DNSQuestion,
    DNSQuestionType,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError

from cpcli.cluster.messages import NAME_RE
from cpcli.errors import PeerLostError, TransportError
from cpcli.transport.protocol import PROTOCOL_VERSION

SERVICE_TYPE = "_cpcli._tcp.local."
DEFAULT_CLUSTER = "default"  # the cluster of a manager or worker started without --cluster
# Responders multicast an answer within 20-620 ms (delay plus aggregation), or 1 s later when they
# multicast it within the last second (RFC 6762 sections 6 and 14): wait this long after the last
# new manager for any other before calling the answer complete.
SETTLE_S = 1.2
RESOLVE_S = 1.0  # SRV, TXT and A normally arrive with the PTR; a responder that needs longer is gone
# Ask for multicast answers (QM), never unicast ones (QU): every program on a machine shares UDP
# port 5353 with SO_REUSEPORT, so a unicast answer lands in any one of them, maybe not the asker.
QUESTION = DNSQuestionType.QM
MAX_EVENTS = 1000  # browser events handled per search; a LAN with more cpcli managers is not a lab
MDNS_GROUP = ("224.0.0.251", 5353)  # RFC 6762 section 3; answers come from its port (section 6)
TYPE_PTR, CLASS_IN = 12, 1  # RFC 1035 section 3.2
# When a search sends its one-shot queries, in seconds after it starts: a query or answer lost on a busy
# machine is asked for again soon, then about as rarely as the browser asks (0, 1, 5 and 14 s).
ONE_SHOT_AT_S = (0.0, 0.25, 1.0, 5.0, 14.0)
MAX_ANSWERS = 1000  # datagrams handled on a search's own port; past that only the browser listens
LOOP_CALL_S = 5.0  # zeroconf's event loop runs a call of ours in microseconds; longer means it is stuck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagerAdvert:
    """A manager as mDNS shows it: its cluster, name, control address and protocol version."""

    cluster: str
    name: str
    host: str  # the IPv4 address its control socket listens on, the interface it advertises on
    port: int
    protocol: int = PROTOCOL_VERSION
    key: str = ""  # the fingerprint of the manager's public key (never a secret)

    @property
    def address(self) -> str:
        """`HOST:PORT`, as `--manager` takes it."""
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        """`m1 of cluster lab-a at 198.18.0.1:5555`."""
        return f"{self.name} of cluster {self.cluster} at {self.address}"


@dataclass(frozen=True)
class _Search:
    """What one browse heard: managers to use, and those set aside with the reason."""

    found: tuple[ManagerAdvert, ...]
    ignored: tuple[str, ...] = field(default=())


def interface_for(ip: str) -> str:
    """The name of this machine's interface that holds IPv4 address `ip` (e.g. `eth0`).

    Raises:
        TransportError: `ip` is not an IPv4 address of this machine, or its interface is down.
    """
    return _local_network(ip)[0]


def _local_network(ip: str) -> tuple[str, ipaddress.IPv4Network]:
    """The interface holding address `ip`, and the network it reaches there (checked as in interface_for)."""
    try:
        parsed = ipaddress.IPv4Address(ip)
    except ValueError as err:
        raise TransportError(f"interface {ip!r} is not an IPv4 address",
                             hint="pass --interface with one of this machine's IPv4 addresses") from err
    if parsed.is_unspecified or parsed.is_multicast:
        raise TransportError(f"interface {ip} is not the address of one interface",
                             hint="pass --interface with one of this machine's IPv4 addresses")
    mine: dict[str, tuple[str, str | None]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family == socket.AF_INET:
                mine.setdefault(addr.address, (name, addr.netmask))
    if ip not in mine:
        listed = ", ".join(f"{a} ({n})" for a, (n, _) in sorted(mine.items())) or "none"
        raise TransportError(f"{ip} is not an address of this machine; its IPv4 addresses: {listed}",
                             hint="pass --interface (or set CP_INTERFACE) to one of them")
    name, netmask = mine[ip]
    stats = psutil.net_if_stats().get(name)
    if stats is not None and not stats.isup:
        raise TransportError(f"interface {name} ({ip}) is down", hint="bring it up or pick another --interface")
    return name, ipaddress.IPv4Network(f"{ip}/{netmask or 32}", strict=False)


class Advertiser:
    """Advertise a manager as `_cpcli._tcp.local.` on one interface: start()/stop() or `with`.

    The instance name is `<name>@<cluster>`, so managers of different clusters may share a name;
    a second manager with the same name in the same cluster is refused when it starts.
    """

    def __init__(self, advert: ManagerAdvert, interface: str) -> None:
        _check_advert(advert, interface)
        self.advert = advert
        self.interface = interface
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None

    def __enter__(self) -> Advertiser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Probe for a manager of the same name and cluster, then announce this one (about 1.5 s).

        Raises:
            TransportError: the name is taken in this cluster, or mDNS cannot run on the interface.
        """
        if self._zc is not None:
            return
        interface_for(self.interface)
        a = self.advert
        info = ServiceInfo(
            SERVICE_TYPE, f"{a.name}@{a.cluster}.{SERVICE_TYPE}", port=a.port,
            properties={"cluster": a.cluster, "name": a.name, "protocol": str(a.protocol), "key": a.key},
            # One host name per address and port: managers never share an A record.
            server=f"cpcli-{a.host.replace('.', '-')}-{a.port}.local.", parsed_addresses=[a.host])
        zc = _open(self.interface)
        try:
            zc.register_service(info, allow_name_change=False)
        except BaseException as err:  # whatever stops the registration, the Zeroconf thread must end
            holder = _holder(zc, info.name) if isinstance(err, NonUniqueNameException) else ""
            zc.close()
            if isinstance(err, NonUniqueNameException):
                raise TransportError(f"a manager named {a.name} of cluster {a.cluster} is already advertised on "
                                     f"the network of {self.interface}{holder}",
                                     hint="give this one another --name, or another --cluster") from err
            if isinstance(err, ZeroconfError):
                raise TransportError(f"mDNS could not advertise manager {a.name} on {self.interface}: "
                                     f"{type(err).__name__} {err}".rstrip()) from err
            raise
        self._zc, self._info = zc, info

    def stop(self) -> None:
        """Say goodbye on the network (browsers drop this manager at once) and close; idempotent."""
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is None or info is None:
            return
        try:
            zc.unregister_service(info)
        except ZeroconfError as err:
            raise TransportError(f"mDNS could not withdraw manager {self.advert.name} on {self.interface}: "
                                 f"{type(err).__name__}") from err
        finally:
            zc.close()


def find_managers(interface: str, timeout_s: float, cluster: str | None = None,
                  settle_s: float | None = SETTLE_S) -> list[ManagerAdvert]:
    """Managers advertised on the network of `interface` (of `cluster`, when given), sorted.

    Returns `settle_s` after the last new manager was heard (None: browse the whole `timeout_s`), or
    after `timeout_s` when none was, so never later than `timeout_s + settle_s`. Managers speaking
    another protocol version are left out, with a warning in the log.
    """
    return list(_search(interface, timeout_s, cluster, settle_s).found)


def find_manager(interface: str, timeout_s: float, cluster: str | None = None,
                 settle_s: float = SETTLE_S, key: str | None = None) -> ManagerAdvert:
    """The one manager (of `cluster`, and holding the key of fingerprint `key`, when given) on `interface`'s network.

    Raises:
        PeerLostError: none answered within `timeout_s`.
        TransportError: several did (the message lists them), or mDNS cannot run on the interface.
    """
    search = _search(interface, timeout_s, cluster, settle_s, key)
    of_cluster = f" of cluster {cluster}" if cluster else ""
    if not search.found:
        seen = f"; ignored: {', '.join(search.ignored)}" if search.ignored else ""
        raise PeerLostError(f"no cpcli manager{of_cluster} found on {interface} within {timeout_s:g} s{seen}",
                            hint=f"is `cp manager{' --cluster ' + cluster if cluster else ''}` running on this "
                                 "network? or pass --manager HOST:PORT")
    if len(search.found) > 1:
        listed = ", ".join(a.describe() for a in search.found)
        raise TransportError(f"{len(search.found)} managers{of_cluster} found on {interface}: {listed}",
                             hint="give the managers different --cluster names, or pass --manager HOST:PORT"
                             if cluster else "pass --cluster NAME or --manager HOST:PORT")
    return search.found[0]


def _search(interface: str, timeout_s: float, cluster: str | None, settle_s: float | None,
            key: str | None = None) -> _Search:
    if timeout_s <= 0 or (settle_s is not None and settle_s < 0):
        raise ValueError(f"timeout_s must be above 0 and settle_s not below 0, got {timeout_s}, {settle_s}")
    _, network = _local_network(interface)
    events: queue.Queue[tuple[str, bool]] = queue.Queue()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        events.put((name, state_change is not ServiceStateChange.Removed))  # called on the browser's thread

    found: dict[str, ManagerAdvert] = {}
    ignored: dict[str, str] = {}
    started = time.monotonic()
    deadline = started + timeout_s
    latest = deadline + (settle_s or 0.0)  # a manager heard just before the deadline still gets its settle
    stop_at = deadline
    zc = _open(interface)
    try:
        with (ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change], question_type=QUESTION),
              _OneShotQueries(zc, interface, network)):  # its answers reach zc's cache, where both look
            for _ in range(MAX_EVENTS):
                remaining_s = stop_at - time.monotonic()
                if remaining_s <= 0:
                    break
                try:
                    name, present = events.get(timeout=remaining_s)
                except queue.Empty:
                    break
                found.pop(name, None)
                ignored.pop(name, None)
                if not present:
                    continue
                advert, why = _resolve(zc, name, min(RESOLVE_S, max(0.0, latest - time.monotonic())), network, cluster,
                                       key)
                if advert is not None:
                    found[name] = advert
                    if settle_s is not None:
                        stop_at = min(time.monotonic() + settle_s, latest)
                elif why:
                    ignored[name] = why
    except ZeroconfError as err:
        raise TransportError(f"mDNS browsing failed on {interface}: {type(err).__name__} {err}".rstrip()) from err
    finally:
        zc.close()
    log.debug("mDNS search on %s: %d found, %d ignored in %.2f s", interface, len(found), len(ignored),
              time.monotonic() - started)
    ordered = sorted(found.values(), key=lambda a: (a.cluster, a.name, a.host, a.port))
    return _Search(tuple(ordered), tuple(ignored[n] for n in sorted(ignored)))


def _resolve(zc: Zeroconf, name: str, timeout_s: float, network: ipaddress.IPv4Network, cluster: str | None,
             key: str | None = None) -> tuple[ManagerAdvert | None, str]:
    """The advert behind instance `name`, or None and why it is not usable ('' when not worth a word)."""
    info = ServiceInfo(SERVICE_TYPE, name)
    if not info.request(zc, timeout_s * 1000.0, question_type=QUESTION):  # zeroconf takes milliseconds
        log.debug("mDNS: %s did not resolve within %.1f s", name, timeout_s)
        return None, ""
    txt: dict[str, Any] = info.decoded_properties
    hosts = info.parsed_addresses(IPVersion.V4Only)
    try:
        advert = ManagerAdvert(cluster=str(txt["cluster"]), name=str(txt["name"]), host=hosts[0],
                               port=int(info.port or 0), protocol=int(txt["protocol"]), key=str(txt.get("key") or ""))
    except (KeyError, IndexError, TypeError, ValueError):
        log.warning("ignoring mDNS service %s: not a cpcli manager advert (TXT %s, addresses %s)", name, txt, hosts)
        return None, f"{name.removesuffix('.' + SERVICE_TYPE)} (not a cpcli manager)"
    if ipaddress.IPv4Address(advert.host) not in network:
        log.debug("ignoring manager %s: outside %s, the network of this interface", advert.describe(), network)
        return None, f"{advert.describe()} (outside {network}, the network of this interface)"
    if advert.protocol != PROTOCOL_VERSION:
        log.warning("ignoring manager %s: it speaks protocol %d, this cpcli speaks %d; install the same "
                    "cpcli version on every machine", advert.describe(), advert.protocol, PROTOCOL_VERSION)
        return None, f"{advert.describe()} (protocol {advert.protocol}, this cpcli speaks {PROTOCOL_VERSION})"
    if cluster is not None and advert.cluster != cluster:
        return None, advert.describe()
    if key is not None and advert.key != key:
        log.warning("ignoring manager %s: its key %s is not the one of this machine's join token (%s)",
                    advert.describe(), advert.key or "(none)", key)
        return None, f"{advert.describe()} (its key {advert.key or '(none)'} is not the one of this machine's token)"
    return advert, ""


class _OneShotQueries(asyncio.DatagramProtocol):
    """One-shot mDNS queries for managers from a UDP port of the search's own, on `interface` only: `with`.

    They run on the event loop of `zc`, which owns the port between enter and exit. An answer is taken
    only from port 5353 of an address in `network` and only with the id of a query sent; its records then
    go into `zc`'s cache as a multicast answer's would, so the browser and `_resolve` see them there.
    Such answers carry no cache-flush bit, so they push no record out; zeroconf's responders give the
    full TTL rather than at most 10 s (RFC 6762 section 6.7), harmless in a cache that lives as long as
    the search.
    """

    def __init__(self, zc: Zeroconf, interface: str, network: ipaddress.IPv4Network) -> None:
        if zc.loop is None:
            raise TransportError(f"mDNS on {interface} has no event loop running")
        self._zc, self._loop, self._interface, self._network = zc, zc.loop, interface, network
        self._transport: asyncio.DatagramTransport | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._ids: set[int] = set()
        self._datagrams = 0

    def __enter__(self) -> _OneShotQueries:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self._interface))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)  # RFC 6762 section 11
            sock.bind((self._interface, 0))  # answers come to this address and port only
            self._call(self._start(sock))
        except BaseException as err:
            sock.close()  # harmless when closed already
            if isinstance(err, OSError):
                raise TransportError(f"mDNS could not open a port to ask on {self._interface}: "
                                     f"{err.strerror or err}") from err
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # Python 3.11's is not one by class

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._datagrams += 1
        if self._datagrams >= MAX_ANSWERS and self._transport is not None:
            self._transport.close()
        host, port = addr[0], addr[1]
        if port != MDNS_GROUP[1] or ipaddress.IPv4Address(host) not in self._network:
            return
        msg = DNSIncoming(data, (host, port))  # never raises: a packet it cannot parse is not valid
        if msg.valid and msg.is_response() and msg.id in self._ids:
            self._zc.record_manager.async_updates_from_response(msg)

    def error_received(self, exc: Exception) -> None:
        # A query that could not go out (the link is down, say); the next one, or the browser, may do better.
        log.debug("mDNS one-shot query on %s: %s", self._interface, exc)

    async def _start(self, sock: socket.socket) -> None:
        await self._loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._timers = [self._loop.call_later(at_s, self._send) for at_s in ONE_SHOT_AT_S]

    async def _stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await asyncio.sleep(0)  # the transport closes the socket on the next pass of the loop

    def _send(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        # A fresh id each time: a responder ignores a packet identical to one it had in the last 0.8 s.
        query_id = random.randint(1, 0xFFFF)
        out = DNSOutgoing(0, False, query_id)  # flags 0: a query; multicast=False: it carries its id
        out.add_question(DNSQuestion(SERVICE_TYPE, TYPE_PTR, CLASS_IN))
        self._ids.add(query_id)
        for packet in out.packets():
            self._transport.sendto(packet, MDNS_GROUP)

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` on zeroconf's event loop and wait for it, bounded."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            future.result(LOOP_CALL_S)
        except concurrent.futures.TimeoutError as err:
            future.cancel()
            raise TransportError(f"mDNS on {self._interface} did not respond within {LOOP_CALL_S:g} s",
                                 hint="is this machine overloaded?") from err


def _open(interface: str) -> Zeroconf:
    """A Zeroconf that sends and hears mDNS on `interface` only, IPv4 only."""
    try:
        zc = Zeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)
    except OSError as err:
        raise TransportError(f"mDNS could not start on {interface}: {err.strerror or err}",
                             hint="is UDP port 5353 held by a program that does not share it "
                                  "(avahi with disallow-other-stacks=yes)?") from err
    except ZeroconfError as err:
        raise TransportError(f"mDNS could not start on {interface}: {type(err).__name__} {err}".rstrip()) from err
    return zc


def _holder(zc: Zeroconf, name: str) -> str:
    """` (198.18.0.3:5555)`: where the manager already holding instance `name` listens, if it says."""
    info = ServiceInfo(SERVICE_TYPE, name)
    try:
        if not info.request(zc, RESOLVE_S * 1000.0, question_type=QUESTION):  # zeroconf takes milliseconds
            return ""
    except ZeroconfError:
        return ""
    hosts = info.parsed_addresses(IPVersion.V4Only)
    return f" ({hosts[0]}:{info.port})" if hosts else ""


def _check_advert(advert: ManagerAdvert, interface: str) -> None:
    problems = [f"{what} {value!r} must be 1-30 letters, digits, '.', '_' or '-', starting with a letter or digit"
                for what, value in (("cluster", advert.cluster), ("name", advert.name))
                if not NAME_RE.fullmatch(value)]
    if not 0 < advert.port < 65536:
        problems.append(f"port {advert.port} is not a TCP port")
    if advert.host != interface:
        problems.append(f"host {advert.host} is not the interface {interface} it is advertised on")
    if problems:
        raise TransportError(f"cannot advertise manager {advert.name!r}: {'; '.join(problems)}")
