"""Two ways the executor waits, shared by the saga loop and the notification loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def renewing(call: Awaitable[T], interval: float, renew: Callable[[], Awaitable[None]]) -> T:
    """Await `call`, running `renew` every `interval` seconds while it is in flight (it
    keeps what the call is made under: a lease, a slot). If `renew` raises, the call is
    cancelled and the error goes on."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            await renew()
    finally:
        if not task.done():
            task.cancel()
