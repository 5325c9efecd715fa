"""SSRF under the default delivery policy, by hostname and by address form.

tests/test_relay.py covers literal private addresses at creation and loopback
literals at send time. Here: hostnames that resolve to non-public addresses
(refused at creation and at send time), DNS rebinding (public when the
listener is created, private when the relay sends), IPv4-mapped IPv6 and
decimal, octal and hex IPv4 forms at send time, and IPv6 forms that carry an
IPv4 address (NAT64, 6to4, IPv4-compatible and -translated, Teredo) or are
site-local, as literals and as DNS answers, at creation (CLI and REST API)
and at send time. tests/test_netpolicy.py has the table of forms as pure logic.

No traffic leaves this machine: names are in the reserved .test domain and
resolved by a fake resolver (socket.getaddrinfo patched, in-process relay),
public addresses are only ever resolved, never connected to, and the relay's
event loop refuses (and records) any connection to a non-loopback address,
so a policy failure shows up as a recorded attempt, not as a packet.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from faultkit import FULL, FaultReceiver, World, answer, delivery, record
from receivers import wait_until

from cdc_hooks.web import create_app

pytestmark = pytest.mark.faults

PUBLIC = "93.184.216.34"  # resolved, never connected to

PRIVATE_NAMES = {
    "loopback.test": ["127.0.0.1"],
    "loopback-other.test": ["127.53.0.1"],
    "loopback6.test": ["::1"],
    "unspecified.test": ["0.0.0.0"],
    "ten.test": ["10.1.2.3"],
    "one-seven-two.test": ["172.16.5.4"],
    "one-nine-two.test": ["192.168.1.1"],
    "metadata.test": ["169.254.169.254"],
    "cgnat.test": ["100.64.0.1"],
    "ula.test": ["fd12:3456::1"],
    "link-local6.test": ["fe80::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mapped-metadata.test": ["::ffff:169.254.169.254"],
}
MIXED = {"mixed.test": [PUBLIC, "10.0.0.1"]}  # one public address is not enough

# Literal forms of loopback, metadata and private addresses (none needs DNS).
LITERAL_HOSTS = ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
                 "[::ffff:a9fe:a9fe]", "[::ffff:10.0.0.1]", "[::]", "[::1]", "2130706433",
                 "0177.0.0.1", "017700000001", "0x7f000001", "0x7f.1", "127.1", "0",
                 "0251.0376.0251.0376"]  # the last: 169.254.169.254 in octal

# IPv6 forms that reach an IPv4 host through a translator or a tunnel (or are
# site-local), of loopback, metadata and private addresses.
EMBEDDED_ADDRESSES = {
    "nat64-loopback": "64:ff9b::7f00:1",
    "nat64-metadata": "64:ff9b::a9fe:a9fe",
    "nat64-ten": "64:ff9b::a00:5",
    "nat64-local-use": "64:ff9b:1::7f00:1",
    "sixtofour-loopback": "2002:7f00:1::1",
    "sixtofour-metadata": "2002:a9fe:a9fe::",
    "compatible-dotted": "::127.0.0.1",
    "compatible-hex": "::7f00:1",
    "translated-loopback": "::ffff:0:7f00:1",
    "teredo-loopback-client": "2001:0:4136:e378:8000:63bf:80ff:fffe",
    "site-local": "fec0::1",
}
EMBEDDED_HOSTS = [f"[{address}]" for address in EMBEDDED_ADDRESSES.values()]
EMBEDDED_NAMES = {f"{name}.test": [address] for name, address in EMBEDDED_ADDRESSES.items()}
TOKEN = "ssrf-test-token-0123456789"


class FakeDNS:
    """socket.getaddrinfo for names of the .test domain, from a table the test sets."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.names: dict[str, list[str]] = {}
        self.asked: list[str] = []

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                 flags: int = 0) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if not (isinstance(name, str) and name.rstrip(".").endswith(".test")):
            return self.real(host, port, family, type, proto, flags)
        self.asked.append(name)
        number = int(port) if port else 0
        found = []
        for address in self.names.get(name.rstrip("."), []):
            kind = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (0, kind):
                found.append((kind, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                              (address, number, 0, 0) if kind == socket.AF_INET6 else (address, number)))
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return found


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDNS]:
    fake = FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake


class Guard:
    """The relay loop's sock_connect, refusing (and noting) any non-loopback address."""

    def __init__(self) -> None:
        self.refused: list[Any] = []
        self.connected: list[Any] = []

    def install(self, loop: Any) -> None:
        original = loop.sock_connect

        async def sock_connect(sock: socket.socket, address: Any) -> None:
            ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_loopback:
                self.refused.append(address)
                raise OSError(f"test guard: no connection off this machine ({address[0]})")
            self.connected.append(address)
            await original(sock, address)

        loop.sock_connect = sock_connect


def default_policy_world(world: World) -> None:
    world.setup(delivery(timeout=0.5, retry_schedule=[0.2], allow_private=False))


def insert_listener(world: World, url: str) -> int:
    """A listener stored without the creation check (SQL, an older version, a DNS
    answer that changed since): the relay must refuse it on its own."""
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    world.listener_secrets.append(secret)
    return world.scalar("INSERT INTO cdc_hooks.listeners (hook, url, secret) VALUES"
                        " ('person', %s, %s) RETURNING id", url, secret)


def refused_at_send_time(world: World, in_process: Any, receiver: FaultReceiver,
                         listeners: dict[int, str]) -> dict[int, str]:
    """Runs a change through a guarded in-process relay; returns each listener's error."""
    guard = Guard()
    in_process(prepare=guard.install)
    world.insert(1, 1)
    world.wait_settled(timeout=60)
    rows = {r[0]: r for r in world.conn.execute(
        "SELECT d.listener_id, d.status, d.attempts, d.last_error FROM cdc_hooks.deliveries d")}
    assert set(rows) == set(listeners), "every listener got its delivery on record"
    for listener_id, url in listeners.items():
        _, status, attempts, error = rows[listener_id]
        assert (status, attempts) == ("dead", 1), (url, status, attempts, error)
        assert "refused by the delivery policy" in error or "invalid URL" in error, (url, error)
    assert guard.refused == [], f"the relay tried to connect off this machine: {guard.refused}"
    assert receiver.hits() == [], "a refused address was reached"
    return {lid: rows[lid][3] for lid in listeners}


def test_hostnames_resolving_to_non_public_addresses_are_refused_at_creation(world, dns):
    default_policy_world(world)
    dns.names.update(PRIVATE_NAMES | MIXED | {"public.test": [PUBLIC]})
    refused = 0
    for name, addresses in (PRIVATE_NAMES | MIXED).items():
        result = world.cli("listeners", "add", "person", f"http://{name}/hook")
        assert result.exit_code == 2, (name, result.output)
        assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1
        assert "refused by the delivery policy" in result.stderr, (name, result.stderr)
        assert addresses[-1] in result.stderr or addresses[0] in result.stderr, result.stderr
        refused += 1
    assert world.scalar("SELECT count(*) FROM cdc_hooks.listeners") == 0
    # The same check lets a public name through (it is only resolved, never connected to).
    world.add_listener("http://public.test/hook")
    assert set(dns.asked) >= set(PRIVATE_NAMES)
    record("SSRF: hostnames, at creation", f"{refused} names resolving to loopback, private, "
           "link-local, metadata, CGNAT, ULA, IPv4-mapped addresses, and one to public + private",
           events=refused, faults=refused, lost=0, notes="every one refused by `listeners add`, "
           "nothing stored")


def test_hostnames_resolving_to_non_public_addresses_are_refused_at_send_time(world, dns,
                                                                             in_process):
    default_policy_world(world)
    receiver = world.receiver()  # on 127.0.0.1: a mistaken connection would land here
    dns.names.update(PRIVATE_NAMES)
    listeners = {insert_listener(world, f"http://{name}:{receiver.port}/hook"): name
                 for name in PRIVATE_NAMES}
    errors = refused_at_send_time(world, in_process, receiver, listeners)
    assert all("refused by the delivery policy" in e for e in errors.values()), errors
    record("SSRF: hostnames, at send time", f"{len(listeners)} stored listeners whose names "
           "resolve to non-public addresses", events=len(listeners), faults=len(listeners),
           lost=0, notes="each delivery refused before connecting, dead after 1 attempt; "
           "nothing reached a receiver")


def test_dns_rebinding_is_refused_at_send_time(world, dns, in_process):
    """Public when the listener is created, loopback when the relay sends."""
    default_policy_world(world)
    receiver = world.receiver()
    dns.names["rebind.test"] = [PUBLIC]
    listener = world.add_listener(f"http://rebind.test:{receiver.port}/hook")  # passes the check
    dns.names["rebind.test"] = ["127.0.0.1"]
    errors = refused_at_send_time(world, in_process, receiver, {listener: "rebind.test"})
    assert "rebind.test resolves to 127.0.0.1" in errors[listener], errors
    record("SSRF: DNS rebinding", "a name public at creation, 127.0.0.1 at send time",
           events=1, faults=1, lost=0, notes="refused at send time, dead after 1 attempt; the "
           "receiver on 127.0.0.1 got nothing")


def test_address_forms_are_refused_at_creation(world):
    default_policy_world(world)
    for host in LITERAL_HOSTS:
        result = world.cli("listeners", "add", "person", f"http://{host}/hook")
        assert result.exit_code == 2, (host, result.output)
        assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1, host
        assert "refused by the delivery policy" in result.stderr or "dotted form" in result.stderr
    assert world.scalar("SELECT count(*) FROM cdc_hooks.listeners") == 0


def test_address_forms_are_refused_at_send_time(world, in_process):
    default_policy_world(world)
    receiver = world.receiver()
    listeners = {insert_listener(world, f"http://{host}:{receiver.port}/hook"): host
                 for host in LITERAL_HOSTS}
    refused_at_send_time(world, in_process, receiver, listeners)
    record("SSRF: address forms", f"{len(LITERAL_HOSTS)} IPv4-mapped IPv6, decimal, octal, hex "
           "and short IPv4 forms of loopback, private and metadata addresses",
           events=len(LITERAL_HOSTS), faults=len(LITERAL_HOSTS), lost=0,
           notes="refused by `listeners add` and, stored anyway, by the relay (1 attempt each)")


def test_ipv6_forms_embedding_ipv4_are_refused_at_creation(world, dns):
    """By `listeners add` and by POST /api/listeners, as literals and as DNS answers."""
    default_policy_world(world)
    dns.names.update(EMBEDDED_NAMES)
    hosts = EMBEDDED_HOSTS + list(EMBEDDED_NAMES)
    with TestClient(create_app(world.config, token=TOKEN)) as api:
        for host in hosts:
            url = f"http://{host}/hook"
            result = world.cli("listeners", "add", "person", url)
            assert result.exit_code == 2, (host, result.output)
            assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1
            assert "refused by the delivery policy" in result.stderr, (host, result.stderr)
            response = api.post("/api/listeners", json={"hook": "person", "url": url},
                                headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 422, (host, response.text)
            assert "refused by the delivery policy" in response.json()["detail"], host
    assert world.scalar("SELECT count(*) FROM cdc_hooks.listeners") == 0
    record("SSRF: IPv6 forms embedding IPv4, at creation",
           f"{len(EMBEDDED_HOSTS)} NAT64, 6to4, IPv4-compatible, -translated, Teredo and "
           "site-local forms of loopback, metadata and private addresses, as literals and as "
           "DNS answers", events=2 * len(hosts), faults=2 * len(hosts), lost=0,
           notes="every one refused by `listeners add` and by POST /api/listeners, nothing stored")


def test_ipv6_forms_embedding_ipv4_are_refused_at_send_time(world, dns, in_process):
    """Listeners created while private networks were allowed; the relay then runs
    with them refused: nothing may reach the receiver on 127.0.0.1."""
    world.setup(delivery(timeout=0.5, retry_schedule=[0.2], allow_private=True))
    receiver = world.receiver()
    dns.names.update(EMBEDDED_NAMES)
    hosts = EMBEDDED_HOSTS + list(EMBEDDED_NAMES)
    listeners = {world.add_listener(f"http://{host}:{receiver.port}/hook"): host for host in hosts}
    world.configure(delivery(timeout=0.5, retry_schedule=[0.2], allow_private=False))
    errors = refused_at_send_time(world, in_process, receiver, listeners)
    assert all("refused by the delivery policy" in e for e in errors.values()), errors
    record("SSRF: IPv6 forms embedding IPv4, at send time",
           f"{len(listeners)} listeners added while private networks were allowed, to the "
           "forms above (literals and names), sent with them refused", events=len(listeners),
           faults=len(listeners), lost=0, notes="each delivery refused before connecting, dead "
           "after 1 attempt; nothing reached the receiver on 127.0.0.1")


@pytest.mark.skipif(not FULL, reason="full run only (CDC_HOOKS_FAULTS=full): waits out the DNS cache")
def test_a_name_that_turns_private_while_the_relay_runs(world, dns, in_process):
    """127.0.0.2 stands in for a public address (allowed_networks); the name then
    turns to 127.0.0.1, which the policy refuses: after the relay's DNS cache
    (10 s) expires, nothing may reach 127.0.0.1."""
    world.setup(delivery(timeout=0.5, retry_schedule=[0.2], allow_private=False,
                         extra='allowed_networks = ["127.0.0.2/32"]\n'))
    allowed = world.receiver(host="127.0.0.2")
    refused = FaultReceiver()
    refused.start(allowed.port)  # the same port on 127.0.0.1
    world.receivers.append(refused)
    # Connection: close, so that each delivery connects (and resolves, past the cache) anew.
    allowed.on("/hook", answer(headers={"Connection": "close"}))
    dns.names["flip.test"] = ["127.0.0.2"]
    listener = world.add_listener(f"http://flip.test:{allowed.port}/hook")
    guard = Guard()
    in_process(prepare=guard.install)
    world.insert(1, 1)
    allowed.wait_ok(1)
    dns.names["flip.test"] = ["127.0.0.1"]
    for i in range(2, 14):  # through the cache's expiry
        world.insert(i, i)
        wait_until(lambda i=i: world.scalar("SELECT count(*) FROM cdc_hooks.deliveries WHERE"
                                            " status <> 'pending'") == i, timeout=30)
        time.sleep(1)
    assert refused.hits() == [] and guard.refused == []
    statuses = [r[2] for r in world.deliveries(listener)]
    assert statuses[0] == "delivered" and "dead" in statuses, statuses
    record("SSRF: name turns private mid-run", "allowed address, then 127.0.0.1 (refused)",
           events=len(statuses), faults=statuses.count("dead"), lost=0,
           notes="sent to the allowed address while cached, refused once re-resolved; "
                 "nothing reached 127.0.0.1")
