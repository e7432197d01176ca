"""One LISTEN connection per process, fanning PostgreSQL notifications out to waiters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

from app.logs import describe_error
from app.settings import libpq_url

log = logging.getLogger(__name__)


class Listener:
    """Keeps a LISTEN connection open (reconnecting), calling `on_notify(channel, payload)`."""

    def __init__(self, url: str, channels: list[str], on_notify: Callable[[str, str], None]):
        self.url = libpq_url(url)
        self.channels = channels
        self.on_notify = on_notify
        self.connected = asyncio.Event()

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    for channel in self.channels:
                        await conn.execute(f'LISTEN "{channel}"')
                    self.connected.set()
                    delay = 0.2
                    # Anything may have happened while we were not listening.
                    for channel in self.channels:
                        self.on_notify(channel, "")
                    async for note in conn.notifies():
                        self.on_notify(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                log.warning(
                    "listener connection lost, reconnecting",
                    extra={"error": describe_error(exc)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


class SagaWaiters:
    """Long-poll support: wake the requests waiting on a saga when it finishes."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def register(self, saga_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.setdefault(saga_id, set()).add(event)
        return event

    def unregister(self, saga_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(saga_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[saga_id]

    def notify(self, saga_id: str) -> None:
        if saga_id:
            for event in self._waiters.get(saga_id, ()):
                event.set()
        else:  # reconnected: wake everyone to re-check
            for events in self._waiters.values():
                for event in events:
                    event.set()
