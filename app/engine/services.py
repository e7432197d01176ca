"""The executor's copy of each service: its document, version and breaker.

A copy is never trusted alone where it matters: a call's start is guarded in the
database by the version and the breaker it was decided on (a moved one answers STALE
with the service as it is now), and a decision to wait is only taken on a copy read
moments ago, so a saga never waits on a breaker that another process already closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from app.core.breaker import Breaker
from app.engine.ports import SagaRepository, ServiceView

FRESH_SECONDS = 0.5  # how old a copy may be for a decision to wait on it


class ServiceCache:
    def __init__(self, repo: SagaRepository, clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.clock = clock
        self._views: dict[str, tuple[ServiceView, float]] = {}

    async def get(self, name: str) -> ServiceView | None:
        entry = self._views.get(name)
        if entry is not None:
            return entry[0]
        return await self.refresh(name)

    def peek(self, name: str) -> ServiceView | None:
        """The copy held now, if any (no read)."""
        entry = self._views.get(name)
        return entry[0] if entry is not None else None

    async def refresh(self, name: str) -> ServiceView | None:
        return self.put(name, await self.repo.service(name))

    def put(self, name: str, view: ServiceView | None) -> ServiceView | None:
        """Hold `view` as the service now (None: it is not registered; not kept)."""
        if view is None:
            self._views.pop(name, None)
        else:
            self._views[name] = (view, self.clock())
        return view

    def fresh(self, view: ServiceView) -> bool:
        entry = self._views.get(view.name)
        return entry is not None and entry[0] is view and self.clock() - entry[1] < FRESH_SECONDS

    def breaker_moved(self, name: str, breaker: Breaker) -> None:
        """This process wrote the service's breaker: hold what it wrote."""
        entry = self._views.get(name)
        if entry is not None and entry[0].breaker != breaker:
            self._views[name] = (replace(entry[0], breaker=breaker), self.clock())
