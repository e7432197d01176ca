"""Starting, reading, following and cancelling sagas."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from app.core.definition import DefinitionSpec, NotifySpec, RuleViolation, check_notify
from app.core.hosts import HostPolicy, Verdict, url_host_port
from app.core.labels import label_filters, printable_problem
from app.core.states import SagaStatus
from app.core.views import (
    CancelResult,
    DefinitionRecord,
    Handoff,
    NewSaga,
    SagaDocument,
    SagaSummary,
    SagaView,
    StartResult,
)
from app.participants.network import check_url
from app.store.admin import AdminStore
from app.store.documents import SagaDocuments
from app.store.listen import SagaWaiters
from app.store.registry import Registry
from app.store.sagas import SagaStore
from app.usecases.errors import Problem

IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_WAIT_SECONDS = 30


@dataclass(frozen=True, slots=True)
class StartRequest:
    definition: str
    version: int | None
    input: Any
    idempotency_key: str | None = None
    traceparent: str | None = None
    request_id: str | None = None
    fail_fast: bool = False
    business_key: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    notify: NotifySpec | None = None  # replaces the definition's default


def fingerprint(request: StartRequest) -> str:
    """What an idempotency key is bound to: definition, requested version and input, and
    the business key and labels when there are any (a start without them fingerprints as
    it did before they existed, so keys stored before keep replaying)."""
    bound: dict[str, Any] = {
        "definition": request.definition,
        "version": request.version,
        "input": request.input,
    }
    if request.business_key is not None:
        bound["business_key"] = request.business_key
    if request.labels:
        bound["labels"] = request.labels
    if request.notify is not None:
        bound["notify"] = request.notify.model_dump(mode="json")
    canonical = json.dumps(
        bound,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _bad_filter(name: str, message: str) -> Problem:
    return Problem(
        422,
        message,
        slug="bad-filter",
        errors=[{"loc": ["query", name], "msg": message, "type": "value_error"}],
    )


def _unknown_saga(saga_id: uuid.UUID) -> Problem:
    return Problem(404, f"no saga with id {saga_id}", slug="unknown-saga")


class LocalExecutor(Protocol):
    """This process's executor, when it runs one (`serve`): it takes new sagas over as
    they are created, with no claim and no notification in between."""

    def handoff(self, spec: DefinitionSpec) -> Handoff | None:
        """A lease for the next new saga, when the executor has room for it (with its
        first attempt to start in the same statement, when it can)."""
        ...

    def adopt(self, new: NewSaga, document: SagaDocument, handoff: Handoff) -> None: ...

    def holds(self, saga_id: uuid.UUID) -> bool:
        """Whether the executor drives this saga now and has not ended it: then it is not
        terminal, and its end wakes this process's long-polls."""
        ...


class Sagas:
    def __init__(
        self,
        store: SagaStore,
        documents: SagaDocuments,
        registry: Registry,
        admin: AdminStore,
        waiters: SagaWaiters,
        key_ttl_seconds: float,
        local: LocalExecutor | None = None,
        hosts: HostPolicy | None = None,
    ) -> None:
        self.store = store
        self.documents = documents
        self.registry = registry
        self.admin = admin
        self.waiters = waiters
        self.key_ttl_seconds = key_ttl_seconds
        self.local = local
        self.hosts = hosts or HostPolicy.parse("*")
        # Definitions as last read, by (name, version asked; None: the latest). A version
        # never changes; the latest may, so a start on it is checked against the table
        # in its own statement (StartResult.STALE: read again).
        self._definitions: dict[tuple[str, int | None], DefinitionRecord] = {}

    async def start(self, request: StartRequest) -> tuple[StartResult, SagaDocument]:
        """Create a saga (or find the one this Idempotency-Key created).

        With a key, the first request creates the saga and every later one with the same
        definition and input gets it back (`REPLAYED`); the same key with anything else
        is refused (422). Any number of concurrent requests with one key create one saga.
        """
        key = request.idempotency_key
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            raise Problem(
                422,
                "Idempotency-Key must be 1-255 printable ASCII characters",
                slug="bad-key",
                errors=[
                    {
                        "loc": ["header", "Idempotency-Key"],
                        "msg": "1-255 printable characters",
                        "type": "value_error",
                    }
                ],
            )
        for fresh in (False, True, True):
            definition = await self._definition(request, fresh)
            new = await self._new_saga(request, definition)
            handoff = self.local.handoff(definition.spec) if self.local else None
            result, created = await self.documents.start(new, handoff)
            if result is not StartResult.STALE:
                break
        else:
            raise RuntimeError("the latest version of the definition keeps changing")
        if isinstance(created, SagaDocument):
            if handoff is not None and self.local is not None:
                self.local.adopt(new, created, handoff)
            return result, created
        if result is StartResult.MISMATCH:
            raise Problem(
                422,
                "this Idempotency-Key was used with a different definition, input, "
                "business_key or labels (or notify target)",
                slug="idempotency-key-reused",
            )
        if result is StartResult.BUSY:
            raise Problem(
                409,
                f"definition '{definition.name}' is exclusive and saga {created} with "
                f"business_key {request.business_key!r} is not finished yet: follow Location",
                slug="business-key-busy",
                headers={"Location": f"/v1/sagas/{created}"},
            )
        return result, await self.document(created)

    async def _definition(self, request: StartRequest, fresh: bool) -> DefinitionRecord:
        """The definition a start asks for, as last read unless `fresh`; 422 when unknown."""
        key = (request.definition, request.version)
        definition = None if fresh else self._definitions.get(key)
        if definition is None:
            definition = await self.registry.get_definition(request.definition, request.version)
            if definition is not None:
                self._definitions[key] = definition
        if definition is None:
            what = f"version {request.version} of " if request.version else ""
            raise Problem(
                422,
                f"there is no {what}definition '{request.definition}'",
                slug="unknown-definition",
                errors=[
                    {
                        "loc": ["body", "definition"],
                        "msg": "unknown definition",
                        "type": "value_error",
                    }
                ],
            )
        return definition

    async def _new_saga(self, request: StartRequest, definition: DefinitionRecord) -> NewSaga:
        """What the start stores, once the request passed the definition's rules."""
        if definition.spec.exclusive and request.business_key is None:
            raise Problem(
                422,
                f"definition '{definition.name}' is exclusive: a start needs a business_key",
                slug="business-key-required",
                errors=[
                    {
                        "loc": ["body", "business_key"],
                        "msg": "required by an exclusive definition",
                        "type": "missing",
                    }
                ],
            )
        first = definition.spec.steps[0].action.service
        if request.fail_fast and first is not None:
            wait = await self.admin.circuit_wait_seconds(first)
            if wait is not None:
                raise Problem(
                    503,
                    f"the circuit of service '{first}' is open; retry after {wait:.0f}s",
                    slug="circuit-open",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        notify = request.notify or definition.spec.notify
        if request.notify is not None:
            await self._check_notify(request.notify)
        trace = request.traceparent
        key = request.idempotency_key
        return NewSaga(
            definition=definition,
            input=request.input,
            idempotency_key=key,
            fingerprint=fingerprint(request) if key is not None else None,
            key_ttl_seconds=self.key_ttl_seconds,
            request_id=request.request_id,
            traceparent=trace if trace and _TRACEPARENT.match(trace) else None,
            business_key=request.business_key,
            labels=request.labels,
            notify=notify.model_dump(mode="json") if notify is not None else None,
            latest=request.version is None,
        )

    async def _check_notify(self, notify: NotifySpec) -> None:
        """A start's own notification target: a registered service, an allowed host (422)."""
        known = await self.registry.service_names({notify.service} if notify.service else set())
        violations = check_notify(notify, ("body", "notify"), known, self.hosts)
        slug = "host-not-allowed" if any(v.loc[-1] == "url" for v in violations) else None
        if not violations and notify.url is not None:
            host, port = url_host_port(notify.url)
            if self.hosts.written(host, port).verdict is Verdict.CHECK_ADDRESSES:
                refused = await check_url(self.hosts, host, port)
                if refused:
                    slug = "host-not-allowed"
                    violations.append(
                        RuleViolation(("body", "notify", "url"), f"url is not allowed: {refused}")
                    )
        if violations:
            raise Problem(
                422,
                "; ".join(v.msg for v in violations),
                slug=slug or "invalid-notify",
                errors=[
                    {"loc": list(v.loc), "msg": v.msg, "type": "value_error"} for v in violations
                ],
            )

    async def document(self, saga_id: uuid.UUID) -> SagaDocument:
        """The saga's view as the API answers it."""
        document = await self.documents.view(saga_id)
        if document is None:
            raise _unknown_saga(saga_id)
        return document

    async def get(self, saga_id: uuid.UUID) -> SagaView:
        view = await self.store.get(saga_id)
        if view is None:
            raise _unknown_saga(saga_id)
        return view

    async def wait(self, saga_id: uuid.UUID, seconds: float) -> SagaDocument:
        """The saga as soon as it is terminal, or after `seconds` (long-poll)."""
        if seconds <= 0:
            return await self.document(saga_id)
        # Register before reading so that a notification between the two is not missed.
        event = self.waiters.register(str(saga_id))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(seconds, MAX_WAIT_SECONDS)
            # A saga this process's executor drives and has not ended is not terminal:
            # nothing to read before its end (or the time) wakes this wait.
            unread = self.local is not None and self.local.holds(saga_id)
            while True:
                event.clear()  # before reading: a notification during the read is kept
                if unread:
                    unread = False
                else:
                    saga = await self.document(saga_id)
                    if saga.status.terminal or deadline - loop.time() <= 0:
                        return saga
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=deadline - loop.time())
        finally:
            self.waiters.unregister(str(saga_id), event)

    async def page(
        self,
        limit: int,
        status: SagaStatus | None,
        definition: str | None,
        before: tuple[datetime, uuid.UUID] | None,
        business_key: str | None = None,
        labels: list[str] | None = None,
    ) -> list[SagaSummary]:
        """A page of sagas, newest first. `labels` are `key:value` filters; all must match."""
        if business_key is not None and (problem := printable_problem(business_key)):
            raise _bad_filter("business_key", f"business_key {problem}")
        try:
            wanted = label_filters(labels or [])
        except ValueError as exc:
            raise _bad_filter("label", str(exc)) from None
        if wanted is None:  # one key asked with two values: nothing can match
            return []
        return await self.store.list_page(
            limit, status, definition, before, business_key=business_key, labels=wanted
        )

    async def find(self, query: str) -> SagaView | None:
        """A saga by its id or its idempotency key (the dashboard's search)."""
        try:
            saga_id: uuid.UUID | None = uuid.UUID(query)
        except ValueError:
            saga_id = await self.store.find_by_key(query)
        return await self.store.get(saga_id) if saga_id else None

    async def schedule(self, saga_id: uuid.UUID) -> dict[str, Any]:
        """The executor's side of a saga (due time, wait reason, lease), for operators."""
        return await self.store.schedule(saga_id) or {}

    async def events(
        self, saga_id: uuid.UUID, limit: int, after: int | None
    ) -> list[dict[str, Any]]:
        if await self.store.status(saga_id) is None:
            raise _unknown_saga(saga_id)
        return await self.store.events(saga_id, limit, after)

    async def cancel(self, saga_id: uuid.UUID) -> SagaDocument:
        """Stop forward progress and compensate. The pivot rule is the store's one
        statement: refused while the pivot's call is in flight and once it succeeded."""
        result = await self.store.request_cancel(saga_id)
        if result is CancelResult.NOT_FOUND:
            raise _unknown_saga(saga_id)
        if result is CancelResult.TERMINAL:
            saga = await self.get(saga_id)
            raise Problem(409, f"saga is already {saga.status.value}", slug="saga-terminal")
        if result is CancelResult.PAST_PIVOT:
            raise Problem(
                409,
                "the saga's pivot step is in flight or has succeeded: past the point of no "
                "return it can only go forward",
                slug="past-pivot",
            )
        return await self.document(saga_id)
