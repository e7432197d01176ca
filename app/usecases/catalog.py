"""Registering and reading participant services and saga definitions, and reviewing a
definition: its failure plan and checklist (`app.core.plan`, `app.core.checklist`)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

from app.core.checklist import Review, review
from app.core.definition import (
    DefinitionSpec,
    RuleViolation,
    ServiceSpec,
    call_urls,
    check_definition,
)
from app.core.hosts import HostPolicy, Verdict, url_host_port
from app.core.templates import strip_refs
from app.core.views import DefinitionRecord, ServiceRecord
from app.participants.network import check_url
from app.store.registry import Registry
from app.usecases.errors import Problem

# Reviews kept for the definitions looked at last (a plan is worth computing once).
REVIEW_CACHE_SIZE = 64


class Catalog:
    def __init__(self, registry: Registry, hosts: HostPolicy) -> None:
        self.registry = registry
        self.hosts = hosts
        self._reviews: OrderedDict[str, Review] = OrderedDict()

    async def put_service(
        self, name: str, spec: ServiceSpec, actor: str
    ) -> tuple[ServiceRecord, bool]:
        """Register or replace a service (True: it is new); audited with `actor`. Its
        `base_url` must be allowed by SAGA_ALLOWED_HOSTS, as written (422)."""
        refused = await check_url(self.hosts, *url_host_port(spec.base_url))
        if refused:
            raise Problem(
                422,
                f"base_url is not allowed: {refused}",
                slug="host-not-allowed",
                errors=[{"loc": ["body", "base_url"], "msg": refused, "type": "value_error"}],
            )
        return await self.registry.put_service(name, spec, actor)

    async def register_definition(
        self, spec: DefinitionSpec, actor: str
    ) -> tuple[DefinitionRecord, bool]:
        """Store a new version unless the latest has the same content (True: created);
        every rule that spans fields or needs the registry is checked first (422)."""
        wanted = {
            s.service for st in spec.steps for s in (st.action, st.compensation) if s and s.service
        }
        if spec.notify is not None and spec.notify.service is not None:
            wanted.add(spec.notify.service)
        known = await self.registry.service_names(wanted)
        violations = check_definition(spec, known, self.hosts)
        urls = call_urls(spec)
        if spec.notify is not None and spec.notify.url is not None:
            urls.append((("notify", "url"), spec.notify.url))
        for loc, url in urls:  # names no DNS pattern names: resolved now
            host, port = url_host_port(strip_refs(url))
            if self.hosts.written(host, port).verdict is Verdict.CHECK_ADDRESSES:
                refused = await check_url(self.hosts, host, port)
                if refused:
                    violations.append(RuleViolation(loc, f"{url!r} is not allowed: {refused}"))
        if violations:
            raise Problem(
                422,
                "; ".join(v.msg for v in violations[:5]),
                slug="invalid-definition",
                errors=[
                    {"loc": ["body", *v.loc], "msg": v.msg, "type": "value_error"}
                    for v in violations
                ],
            )
        return await self.registry.register_definition(spec, actor)

    async def service(self, name: str) -> ServiceRecord:
        record = await self.registry.get_service(name)
        if record is None:
            raise Problem(404, f"no service named '{name}'", slug="unknown-service")
        return record

    async def services(self, limit: int, after: str | None) -> list[ServiceRecord]:
        return await self.registry.list_services(limit, after)

    async def definition(self, name: str, version: int | None = None) -> DefinitionRecord:
        record = await self.registry.get_definition(name, version)
        if record is None:
            if version is None:
                raise Problem(404, f"no definition named '{name}'", slug="unknown-definition")
            raise Problem(
                404, f"definition '{name}' has no version {version}", slug="unknown-version"
            )
        return record

    async def find_definition(self, name: str, version: int) -> DefinitionRecord | None:
        return await self.registry.get_definition(name, version)

    async def definitions(self, limit: int, after: str | None) -> list[DefinitionRecord]:
        return await self.registry.list_definitions(limit, after)

    async def services_of(self, spec: DefinitionSpec) -> dict[str, ServiceSpec]:
        """The registered services the definition's calls name (a missing one is left out)."""
        names = sorted(
            {
                c.service
                for st in spec.steps
                for c in (st.action, st.compensation)
                if c and c.service
            }
        )
        found: dict[str, ServiceSpec] = {}
        for name in names:
            record = await self.registry.get_service(name)
            if record is not None:
                found[name] = record.spec
        return found

    async def review(self, spec: DefinitionSpec) -> Review:
        """The definition's failure plan and checklist, on the services as registered now.
        Worked out in a thread (a long definition takes a while), and kept for the next
        look while neither the definition nor its services change."""
        services = await self.services_of(spec)
        text = "".join(f"|{name}:{s.model_dump_json()}" for name, s in services.items())
        key = hashlib.sha256((spec.content_hash() + text).encode()).hexdigest()
        found = self._reviews.get(key)
        if found is None:
            found = await asyncio.to_thread(review, spec, services)
            self._reviews[key] = found
            while len(self._reviews) > REVIEW_CACHE_SIZE:
                self._reviews.popitem(last=False)
        self._reviews.move_to_end(key)
        return found

    async def plan(self, name: str, version: int | None = None) -> tuple[DefinitionRecord, Review]:
        """One version of a definition (the latest by default) with its review (404s as
        `definition`)."""
        record = await self.definition(name, version)
        return record, await self.review(record.spec)
