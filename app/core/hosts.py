"""Which hosts participants may live on (`SAGA_ALLOWED_HOSTS`): the SSRF guard's rules.

A pattern is a DNS name pattern (`payments.internal`, `*.svc.cluster.local`, optionally
`:port`) or an IP address / CIDR block (`127.0.0.1`, `10.0.0.0/8`, `[::1]`,
`[fd00::/8]:9000`); `*` means every other host. The two kinds never cross: a DNS pattern
matches names only, an IP/CIDR entry addresses only, so `10.0.0.*` is a DNS pattern and
matches no address. Link-local, cloud metadata, unspecified and multicast addresses are
refused whatever the patterns, unless an IP/CIDR entry names them explicitly.

Pure: what a URL's written host allows is decided here; resolving names is the caller's
(the participant client resolves at connect time and asks `address` about each result).
Addresses are parsed by the standard `ipaddress` module, and the legacy IPv4 spellings
(`2130706433`, `0x7f.1`, `0177.0.0.1`) by `socket.inet_aton`, as resolvers read them.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


@dataclass(frozen=True, slots=True)
class DnsPattern:
    glob: str
    port: int | None  # None: any port

    @property
    def address_like(self) -> bool:
        """`10.0.0.*`: written as an address wildcard. It is a DNS pattern, so it matches
        no address; it matches no name either (`10.0.0.attacker.example` is exactly the
        name such a pattern must not let through): write a CIDR block instead."""
        labels = self.glob.split(".")
        return all(label == "*" or label.isdigit() for label in labels) and any(
            label.isdigit() for label in labels
        )

    def matches(self, name: str, port: int) -> bool:
        return not self.address_like and self.port in (None, port) and fnmatchcase(name, self.glob)


@dataclass(frozen=True, slots=True)
class IpPattern:
    network: IPNetwork
    port: int | None


class Verdict(Enum):
    """What the written host of a URL allows, before any name is resolved."""

    NAME_ALLOWED = "name_allowed"  # a DNS pattern (or `*`) names it: addresses need only
    # to avoid the always-refused ranges
    CHECK_ADDRESSES = "check_addresses"  # a name no DNS pattern names: every address it
    # resolves to must lie in an IP/CIDR entry
    ADDRESS_ALLOWED = "address_allowed"  # an IP literal that passed
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.verdict is Verdict.REFUSED


def literal_address(host: str) -> IPAddress | None:
    """The address a host written as an IP literal stands for, in any spelling; None for
    a name. IPv4-mapped IPv6 (`::ffff:127.0.0.1`) is read as the IPv4 address it maps."""
    text = host.strip("[]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if not text or any(c not in "0123456789abcdefx." for c in text.lower()):
            return None
        try:
            address = ipaddress.ip_address(socket.inet_aton(text))
        except OSError:
            return None
    return unmapped(address)


def unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def always_refused(address: IPAddress) -> str | None:
    """Why an address is refused whatever the patterns, or None."""
    address = unmapped(address)
    if address in METADATA:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    return None


def _port(text: str, pattern: str) -> int | None:
    if text in ("", "*"):
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{pattern!r}: {text!r} is not a port")
    return int(text)


def _parse(pattern: str) -> DnsPattern | IpPattern:
    text = pattern.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{pattern!r}: missing ']'")
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{pattern!r}: only ':port' may follow ']'")
        try:
            network = ipaddress.ip_network(text[1:end], strict=False)
        except ValueError:
            raise ValueError(f"{pattern!r}: not an IPv6 address or block") from None
        return IpPattern(network, _port(rest[1:], pattern))
    try:  # a bare address or block, IPv6 included (no port then)
        return IpPattern(ipaddress.ip_network(text, strict=False), None)
    except ValueError:
        pass
    host, sep, port = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return IpPattern(ipaddress.ip_network(host, strict=False), _port(port, pattern))
    except ValueError:
        pass
    if not host or any(c in host for c in "/[]@ "):
        raise ValueError(f"{pattern!r} is neither a DNS name pattern nor an IP address/block")
    return DnsPattern(host.rstrip("."), _port(port, pattern) if sep else None)


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The parsed `SAGA_ALLOWED_HOSTS`."""

    dns: tuple[DnsPattern, ...]
    ips: tuple[IpPattern, ...]
    anything: bool  # `*`: every host not refused whatever the patterns

    @classmethod
    def parse(cls, text: str) -> HostPolicy:
        """Comma-separated patterns; ValueError names the one that cannot be read."""
        dns: list[DnsPattern] = []
        ips: list[IpPattern] = []
        anything = False
        for raw in text.split(","):
            if not raw.strip():
                continue
            if raw.strip() == "*":
                anything = True
                continue
            parsed = _parse(raw)
            (ips if isinstance(parsed, IpPattern) else dns).append(parsed)  # type: ignore[arg-type]
        return cls(tuple(dns), tuple(ips), anything)

    def written(self, host: str, port: int) -> Decision:
        """What a URL's written host allows (its name is not resolved here)."""
        address = literal_address(host)
        if address is not None:
            reason = self.address(address, port, name_allowed=False)
            if reason:
                return Decision(Verdict.REFUSED, reason)
            return Decision(Verdict.ADDRESS_ALLOWED)
        name = host.lower().rstrip(".")
        if self.anything or any(p.matches(name, port) for p in self.dns):
            return Decision(Verdict.NAME_ALLOWED)
        if self.ips:
            return Decision(Verdict.CHECK_ADDRESSES)
        return Decision(Verdict.REFUSED, f"{name}:{port} matches no pattern of SAGA_ALLOWED_HOSTS")

    def address(self, address: IPAddress, port: int, name_allowed: bool) -> str | None:
        """Why connecting to `address` is refused, or None. `name_allowed`: the host was a
        name that a DNS pattern (or `*`) allows, so only the always-refused ranges apply."""
        address = unmapped(address)
        refused = always_refused(address)
        if refused is not None:
            if not any(self._names_explicitly(p, address, port) for p in self.ips):
                return f"{address} is {refused}, refused unless SAGA_ALLOWED_HOSTS names it"
            return None
        if name_allowed or self.anything:
            return None
        if any(self._contains(p, address, port) for p in self.ips):
            return None
        return f"{address}:{port} lies in no IP/CIDR entry of SAGA_ALLOWED_HOSTS"

    @staticmethod
    def _contains(pattern: IpPattern, address: IPAddress, port: int) -> bool:
        return address in pattern.network and pattern.port in (None, port)

    @classmethod
    def _names_explicitly(cls, pattern: IpPattern, address: IPAddress, port: int) -> bool:
        """An entry lets an always-refused address through only when it is about it: the
        address itself for a metadata address, a block narrower than /0 for the others."""
        if not cls._contains(pattern, address, port) or pattern.network.prefixlen == 0:
            return False
        if address in METADATA:
            return pattern.network.num_addresses == 1
        return True


def url_host_port(url: str) -> tuple[str, int]:
    """The host (lowercase, no brackets) and port (the scheme's default) of a URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.hostname or ""), port
