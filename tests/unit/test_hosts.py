"""The allowed-hosts rules (contract §1): DNS patterns and IP/CIDR entries apart, the
always-refused ranges, every spelling of an address, ports."""

from __future__ import annotations

import ipaddress

import pytest

from app.core.hosts import HostPolicy, Verdict, literal_address, url_host_port


def judge(url: str, patterns: str) -> Verdict:
    return HostPolicy.parse(patterns).written(*url_host_port(url)).verdict


@pytest.mark.parametrize(
    ("url", "patterns", "verdict"),
    [
        ("http://api.example.com/x", "*", Verdict.NAME_ALLOWED),
        ("http://10.0.0.1:1/x", "*", Verdict.ADDRESS_ALLOWED),
        ("http://api.example.com/x", "api.example.com", Verdict.NAME_ALLOWED),
        ("http://API.Example.com/x", "api.example.com", Verdict.NAME_ALLOWED),
        ("http://other.com/x", "api.example.com", Verdict.REFUSED),
        ("http://api.example.com.evil.com/x", "api.example.com", Verdict.REFUSED),
        ("http://a.example.com/x", "*.example.com", Verdict.NAME_ALLOWED),
        ("http://a.b.example.com/x", "*.example.com", Verdict.NAME_ALLOWED),
        ("http://example.com/x", "*.example.com", Verdict.REFUSED),
        ("http://evilexample.com/x", "*.example.com", Verdict.REFUSED),
        ("http://a.example.com.evil.org/x", "*.example.com", Verdict.REFUSED),
        ("http://api.example.com:9000/x", "api.example.com", Verdict.NAME_ALLOWED),
        ("http://h.example.com./x", "h.example.com", Verdict.NAME_ALLOWED),  # trailing dot
        ("http://127.0.0.1:9001/x", "127.0.0.1:9001", Verdict.ADDRESS_ALLOWED),
        ("http://127.0.0.1:9002/x", "127.0.0.1:9001", Verdict.REFUSED),
        ("http://127.0.0.2:9001/x", "127.0.0.1:9001", Verdict.REFUSED),
        ("http://127.0.0.1/x", "127.0.0.1:80", Verdict.ADDRESS_ALLOWED),  # default port
        ("http://127.0.0.1/x", "127.0.0.1:443", Verdict.REFUSED),
        ("https://h.example.com/x", "h.example.com:443", Verdict.NAME_ALLOWED),
        ("https://h.example.com/x", "h.example.com:80", Verdict.REFUSED),
        ("http://h:1234/x", "h:*", Verdict.NAME_ALLOWED),
        ("http://h.internal:1234/x", "*.internal:1234", Verdict.NAME_ALLOWED),
        ("http://h.internal:1235/x", "*.internal:1234", Verdict.REFUSED),
        ("http://a/x", "b, c:80 ,a", Verdict.NAME_ALLOWED),
        ("http://a/x", "b,c:80", Verdict.REFUSED),
        ("http://a/x", "", Verdict.REFUSED),
        ("http://[::1]:8080/x", "[::1]:8080", Verdict.ADDRESS_ALLOWED),
        ("http://[::1]:8080/x", "[::1]:9090", Verdict.REFUSED),
        ("http://[fd00::5]:9000/x", "[fd00::/8]:9000", Verdict.ADDRESS_ALLOWED),
        ("http://[fd00::5]:9001/x", "[fd00::/8]:9000", Verdict.REFUSED),
        ("http://[fd00::5]/x", "fd00::/8", Verdict.ADDRESS_ALLOWED),
        # IP and DNS patterns never cross.
        ("http://10.1.2.3/x", "10.0.0.0/8", Verdict.ADDRESS_ALLOWED),
        ("http://10.0.0.attacker.example/x", "10.0.0.0/8", Verdict.CHECK_ADDRESSES),
        ("http://10.0.0.1.nip.io/x", "10.0.0.0/8", Verdict.CHECK_ADDRESSES),
        ("http://10.0.0.1/x", "10.0.0.*", Verdict.REFUSED),
        ("http://10.0.0.attacker.example/x", "10.0.0.*", Verdict.REFUSED),
        ("http://localhost/x", "127.0.0.1", Verdict.CHECK_ADDRESSES),
        ("http://127.0.0.1/x", "localhost", Verdict.REFUSED),
    ],
)
def test_written_hosts(url: str, patterns: str, verdict: Verdict) -> None:
    assert judge(url, patterns) is verdict


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://169.254.1.1/",  # link-local
        "http://[fe80::1]/",
        "http://0.0.0.0:8000/",
        "http://[::]:8000/",
        "http://224.0.0.1/",  # multicast
        "http://[ff02::1]/",
        "http://[::ffff:169.254.169.254]/",  # IPv4-mapped IPv6
        "http://[::ffff:a9fe:a9fe]/",
        "http://2852039166/",  # 169.254.169.254 in decimal
        "http://0xa9fea9fe/",  # ... in hex
        "http://0xa9.0xfe.0xa9.0xfe/",
        "http://0251.0376.0251.0376/",  # ... in octal
        "http://169.254.43518/",  # ... in the two-part form
        "http://0/",  # 0.0.0.0
    ],
)
@pytest.mark.parametrize("patterns", ["*", "*, 0.0.0.0/0, [::/0]", "10.0.0.0/8"])
def test_always_refused_whatever_the_patterns(url: str, patterns: str) -> None:
    assert judge(url, patterns) is Verdict.REFUSED


@pytest.mark.parametrize(
    ("url", "patterns"),
    [
        ("http://169.254.169.254/", "169.254.169.254"),
        ("http://[fd00:ec2::254]/", "[fd00:ec2::254]"),
        ("http://169.254.1.1/", "169.254.0.0/16"),
        ("http://[fe80::1]/", "[fe80::/10]"),
        ("http://224.0.0.1/", "224.0.0.0/4"),
    ],
)
def test_an_explicit_entry_lets_an_always_refused_address_through(url: str, patterns: str) -> None:
    assert judge(url, patterns) is Verdict.ADDRESS_ALLOWED


def test_a_link_local_block_does_not_name_the_metadata_address() -> None:
    assert judge("http://169.254.169.254/", "169.254.0.0/16") is Verdict.REFUSED


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("payments.internal", None),
        ("cafe", None),
        ("deadbeef.example", None),
    ],
)
def test_literal_addresses_in_every_spelling(spelling: str, address: str | None) -> None:
    found = literal_address(spelling)
    assert found == (ipaddress.ip_address(address) if address else None)


def test_resolved_addresses() -> None:
    policy = HostPolicy.parse("*.internal, 10.0.0.0/8")
    meta = ipaddress.ip_address("169.254.169.254")
    inside, outside = ipaddress.ip_address("10.1.1.1"), ipaddress.ip_address("192.0.2.1")
    # A name a DNS pattern allows may resolve anywhere but into the refused ranges.
    assert policy.address(outside, 80, name_allowed=True) is None
    assert "metadata" in (policy.address(meta, 80, name_allowed=True) or "")
    # A name no DNS pattern names must resolve into an IP/CIDR entry.
    assert policy.address(inside, 80, name_allowed=False) is None
    assert "no IP/CIDR entry" in (policy.address(outside, 80, name_allowed=False) or "")
    mapped = ipaddress.ip_address("::ffff:169.254.169.254")
    assert policy.address(mapped, 80, name_allowed=True) is not None


@pytest.mark.parametrize(
    "pattern", ["[::1", "[::1]x", "10.0.0.0/33x", "a b", "user@host", "h:99999", "h:port"]
)
def test_unreadable_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        HostPolicy.parse(pattern)
