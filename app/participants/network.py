"""Connections to participants go only to addresses the host policy allows.

The participant client's connector learns addresses only from `GuardedResolver`, so the
check lives there: for every new connection to a name it asks the policy about the
written host, resolves the name (asynchronously, within a bounded time), checks *every*
address it resolves to, and hands the connector only those checked addresses. The
request keeps the name, so its Host header and TLS server name (and certificate check)
stay right, and nothing can change between the check and the connect (no DNS
rebinding). aiohttp connects to a host written as an IP address without asking any
resolver, so the client checks those with the policy itself before it sends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from aiohttp.abc import AbstractResolver, ResolveResult

from app.core.hosts import HostPolicy, IPAddress, Verdict, literal_address

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
RESOLVE_TIMEOUT_SECONDS = 5.0


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for `host`, in its order, once each."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        seen.setdefault(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]), None)
    return list(seen)


class ConnectFailure(OSError):
    """No connection can be made (the name does not resolve): nothing was sent.

    An OSError, as aiohttp expects of a resolver: it reports it as a connection error
    (ClientConnectorDNSError) with this exception as its cause."""


class BlockedAddress(ConnectFailure):
    """The host, or an address it resolves to, is not allowed: nothing was sent."""


async def vetted_addresses(
    policy: HostPolicy, resolver: Resolver, host: str, port: int, within: float | None
) -> list[IPAddress]:
    """The addresses a connection to host:port may use, every one of them checked.

    BlockedAddress when the policy refuses the host or any address it resolves to (a
    name that resolves to a metadata address is suspect as a whole); ConnectFailure when
    the name does not resolve."""
    decision = policy.written(host, port)
    if decision.refused:
        raise BlockedAddress(decision.reason)
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    try:
        async with asyncio.timeout(min(within or RESOLVE_TIMEOUT_SECONDS, RESOLVE_TIMEOUT_SECONDS)):
            addresses = await resolver(host, port)
    except (OSError, TimeoutError) as exc:
        raise ConnectFailure(f"cannot resolve {host} ({type(exc).__name__})") from None
    if not addresses:
        raise ConnectFailure(f"{host} resolves to no address")
    name_allowed = decision.verdict is Verdict.NAME_ALLOWED
    for address in addresses:
        reason = policy.address(address, port, name_allowed)
        if reason:
            raise BlockedAddress(f"{host} resolves to {reason}")
    return addresses


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for participant connections: only checked addresses, in the
    resolver's order. aiohttp asks it once per new connection to a name (the client
    turns aiohttp's DNS cache off)."""

    def __init__(self, policy: HostPolicy, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await vetted_addresses(self.policy, self.resolver, host, port, None)
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        pass


def blocked_reason(exc: BaseException) -> str | None:
    """The policy's reason when `exc` (an aiohttp error) came from a refused address."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BlockedAddress):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


async def check_url(
    policy: HostPolicy, host: str, port: int, resolver: Resolver = system_resolver
) -> str | None:
    """Registration: why a written URL's host is refused, or None. What is written is
    judged as it stands; only a name that no DNS pattern names is resolved now (it is
    allowed when every address it resolves to lies in an IP/CIDR entry). Every call checks
    again on the addresses of that moment."""
    decision = policy.written(host, port)
    if decision.refused:
        return decision.reason
    if decision.verdict is not Verdict.CHECK_ADDRESSES:
        return None
    try:
        await vetted_addresses(policy, resolver, host, port, RESOLVE_TIMEOUT_SECONDS)
    except BlockedAddress as exc:
        return str(exc)
    except ConnectFailure as exc:
        return f"{exc}: a name that no DNS pattern of SAGA_ALLOWED_HOSTS names must resolve"
    return None
