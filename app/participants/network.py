"""Connections to participants go only to addresses the host policy allows.

The HTTP client's network backend is the one place a participant connection is made, so
the check lives there: for every new connection it asks the policy about the written
host, resolves a name (asynchronously, within the connect timeout), checks *every*
address it resolves to, and connects to one of those checked addresses. The request
keeps the name, so its Host header and TLS server name (and certificate check) stay
right, and nothing can change between the check and the connect (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable

import httpcore
from httpcore._backends.auto import AutoBackend

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


class BlockedAddress(httpcore.ConnectError):
    """The host, or an address it resolves to, is not allowed: nothing was sent."""


async def vetted_addresses(
    policy: HostPolicy, resolver: Resolver, host: str, port: int, within: float | None
) -> list[IPAddress]:
    """The addresses a connection to host:port may use, every one of them checked.

    BlockedAddress when the policy refuses the host or any address it resolves to (a
    name that resolves to a metadata address is suspect as a whole); ConnectError when
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
        raise httpcore.ConnectError(f"cannot resolve {host} ({type(exc).__name__})") from None
    if not addresses:
        raise httpcore.ConnectError(f"{host} resolves to no address")
    name_allowed = decision.verdict is Verdict.NAME_ALLOWED
    for address in addresses:
        reason = policy.address(address, port, name_allowed)
        if reason:
            raise BlockedAddress(f"{host} resolves to {reason}")
    return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, behind the host policy."""

    def __init__(self, policy: HostPolicy, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.resolver = resolver
        self._inner = AutoBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await vetted_addresses(self.policy, self.resolver, host, port, timeout)
        failure: Exception | None = None
        for address in addresses:  # the checked addresses, in the resolver's order
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("participants are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def blocked_reason(exc: BaseException) -> str | None:
    """The policy's reason when `exc` (an httpx error) came from a refused address."""
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
    except httpcore.ConnectError as exc:
        return f"{exc}: a name that no DNS pattern of SAGA_ALLOWED_HOSTS names must resolve"
    return None
