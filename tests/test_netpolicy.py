"""The delivery policy's address check (NetworkPolicy.allows), as pure logic.

The same forms are refused end to end (creation by CLI and API, send time,
DNS answers) in tests/faults/test_faults_ssrf.py.
"""

from __future__ import annotations

import ipaddress

import pytest

from cdc_hooks.netpolicy import NetworkPolicy

# IPv6 forms that carry a non-public IPv4 address (or are non-public themselves):
# each reaches the IPv4 host through a translator or a tunnel.
EMBEDDED_REFUSED = {
    "64:ff9b::7f00:1": "NAT64 of 127.0.0.1",
    "64:ff9b::127.0.0.1": "NAT64 of 127.0.0.1, dotted",
    "64:ff9b::a9fe:a9fe": "NAT64 of the metadata address",
    "64:ff9b::a00:5": "NAT64 of 10.0.0.5",
    "64:ff9b::c0a8:101": "NAT64 of 192.168.1.1",
    "64:ff9b::6440:1": "NAT64 of 100.64.0.1 (shared)",
    "64:ff9b::": "NAT64 of 0.0.0.0",
    "64:ff9b:1::7f00:1": "local-use NAT64 prefix",
    "64:ff9b:1::808:808": "local-use NAT64 prefix, even of a public address",
    "64:ff9b:1:ffff::1": "local-use NAT64 prefix, elsewhere in the /48",
    "2002:7f00:1::1": "6to4 of 127.0.0.1",
    "2002:a9fe:a9fe::": "6to4 of the metadata address",
    "2002:a00:1::1": "6to4 of 10.0.0.1",
    "2002:c0a8:101:1::1": "6to4 of 192.168.1.1",
    "::127.0.0.1": "IPv4-compatible 127.0.0.1",
    "::7f00:1": "IPv4-compatible 127.0.0.1, hex",
    "::169.254.169.254": "IPv4-compatible metadata address",
    "::a00:1": "IPv4-compatible 10.0.0.1",
    "::ffff:0:7f00:1": "IPv4-translated 127.0.0.1",
    "::ffff:0:a9fe:a9fe": "IPv4-translated metadata address",
    "::ffff:0:a00:1": "IPv4-translated 10.0.0.1",
    "::ffff:127.0.0.1": "IPv4-mapped 127.0.0.1",
    "::ffff:7f00:1": "IPv4-mapped 127.0.0.1, hex",
    "::ffff:a9fe:a9fe": "IPv4-mapped metadata address",
    # Teredo: server 65.54.227.120, client 127.0.0.1 (stored inverted: 80ff:fffe).
    "2001:0:4136:e378:8000:63bf:80ff:fffe": "Teredo with a loopback client",
    # Teredo: server 127.0.0.1, client 8.8.8.8 (f7f7:f7f7).
    "2001:0:7f00:1:8000:63bf:f7f7:f7f7": "Teredo with a loopback server",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo, public server and client",
    "fec0::1": "site-local",
    "fec0:0:0:ffff::1": "site-local (the old DNS resolver address)",
    "feff:ffff::1": "site-local, top of the range",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1%eth0": "link-local with a zone",
    "fd00:ec2::254": "ULA (the AWS IPv6 metadata address)",
    "ff0e::1": "global multicast",
}

PUBLIC = {
    "8.8.8.8": "public IPv4",
    "2001:4860:4860::8888": "public IPv6",
    "64:ff9b::808:808": "NAT64 of 8.8.8.8",
    "64:ff9b::8.8.8.8": "NAT64 of 8.8.8.8, dotted",
    "2002:808:808::1": "6to4 of 8.8.8.8",
    "::ffff:8.8.8.8": "IPv4-mapped 8.8.8.8",
    "::ffff:0:808:808": "IPv4-translated 8.8.8.8",
}


@pytest.mark.parametrize("address", sorted(EMBEDDED_REFUSED))
def test_the_default_policy_refuses_embedded_and_non_global_ipv6_forms(address):
    assert not NetworkPolicy().allows(address), EMBEDDED_REFUSED[address]


@pytest.mark.parametrize("address", sorted(PUBLIC))
def test_forms_of_public_addresses_pass(address):
    assert NetworkPolicy().allows(address), PUBLIC[address]


@pytest.mark.parametrize("address", sorted(EMBEDDED_REFUSED))
def test_allow_private_networks_lets_every_form_through(address):
    assert NetworkPolicy(allow_private_networks=True).allows(address)


@pytest.mark.parametrize(("allowed", "address"), [
    ("10.0.0.0/8", "64:ff9b::a00:5"),  # the IPv4 address embedded
    ("10.0.0.0/8", "2002:a00:1::1"),
    ("10.0.0.0/8", "::ffff:10.0.0.1"),
    ("64:ff9b::/96", "64:ff9b::7f00:1"),  # the IPv6 form itself
    ("64:ff9b:1::/48", "64:ff9b:1::808:808"),
    ("fec0::/10", "fec0::1"),
    ("2001::/32", "2001:0:4136:e378:8000:63bf:80ff:fffe"),
    ("::1/128", "::1"),
])
def test_allowed_networks_let_a_chosen_form_through(allowed, address):
    assert NetworkPolicy(allowed_networks=(ipaddress.ip_network(allowed),)).allows(address)


@pytest.mark.parametrize(("allowed", "address"), [
    ("10.0.0.0/8", "64:ff9b::7f00:1"),  # another network than the embedded address's
    ("8.8.8.0/24", "2002:7f00:1::1"),
    ("2001:4860::/32", "fec0::1"),
])
def test_allowed_networks_let_nothing_else_through(allowed, address):
    assert not NetworkPolicy(allowed_networks=(ipaddress.ip_network(allowed),)).allows(address)


@pytest.mark.parametrize("address", ["", "localhost", "1.2.3", "::g", "[::1]"])
def test_what_is_not_an_address_is_refused(address):
    assert not NetworkPolicy(allow_private_networks=True).allows(address)
