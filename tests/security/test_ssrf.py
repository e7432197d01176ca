"""SSRF: what may be called is decided on the written host at registration and on every
address at call time, and the connection goes to an address that passed (contract §1).

All traffic stays on 127.0.0.1: names are resolved through a resolver stub, which is how
"a name that resolves to the metadata address" or "a name whose resolution changes" are
staged without leaving the machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from app.core.hosts import IPAddress
from app.main import create_app
from app.participants.client import ParticipantClient
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.support.api_helpers import assert_problem
from tests.support.engine_helpers import define, put_service, run, step, step_of
from tests.support.servers import Participant, Reply, serve

LOOPBACK = ipaddress.ip_address("127.0.0.1")
METADATA = ipaddress.ip_address("169.254.169.254")


class Resolver:
    """A resolver stub: each name answers the next list of its script (the last repeats)."""

    def __init__(self, script: dict[str, list[list[IPAddress]]]) -> None:
        self.script = script
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        answers = self.script.get(host)
        if not answers:
            raise OSError(f"no such host {host}")
        return answers.pop(0) if len(answers) > 1 else answers[0]


Orchestrator = Callable[..., Any]


@pytest.fixture
def orchestrator_with(db_url: str) -> Orchestrator:
    """An orchestrator (API + executor) with these allowed hosts and this resolver."""

    def make(hosts: str, resolver: Resolver | None = None) -> Any:
        settings = make_settings(SAGA_ALLOWED_HOSTS=hosts)
        client = ParticipantClient(settings.host_policy, resolver) if resolver else None
        app = create_app(settings, db_url, run_executor=True, participant_client=client)
        return _running(app, client)

    return make


class _running:
    """The app served; a participant client given to it is closed here (the app closes
    only the one it made)."""

    def __init__(self, app: Any, participant_client: ParticipantClient | None) -> None:
        self.app = app
        self.participant_client = participant_client

    async def __aenter__(self) -> httpx.AsyncClient:
        self._serve = serve(self.app)
        base = await self._serve.__aenter__()
        self._client = httpx.AsyncClient(base_url=base, timeout=40)
        return self._client

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.aclose()
        await self._serve.__aexit__(*exc)
        if self.participant_client is not None:
            await self.participant_client.aclose()


@pytest.fixture
async def participant_port() -> AsyncIterator[tuple[Participant, int]]:
    p = Participant()
    async with serve(p.app) as base:
        p.url = base
        yield p, int(base.rsplit(":", 1)[1])


REFUSED_URLS = [
    "http://169.254.169.254/latest/meta-data/iam",
    "http://[fd00:ec2::254]/latest",
    "http://100.100.100.200/latest/meta-data",
    "http://169.254.10.20/",  # link-local
    "http://[fe80::1]/",
    "http://0.0.0.0:9001/",
    "http://[::]:9001/",
    "http://224.0.0.251/",
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/",
    "http://2852039166/",  # decimal
    "http://0xa9fea9fe/",  # hex
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://0251.0376.0251.0376/",  # octal
    "http://169.254.43518/",
    "http://127.0.0.1@169.254.169.254/",  # userinfo
    "http://user:pass@127.0.0.1:9001/",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
async def test_refused_at_registration_with_the_default_patterns(
    api: httpx.AsyncClient, url: str
) -> None:
    r = await api.put("/v1/services/meta", json={"base_url": url})
    assert_problem(r, 422)
    doc = {"name": "ssrf", "steps": [{"name": "a", "action": {"url": url + "x"}}]}
    r = await api.post("/v1/definitions", json=doc)
    assert_problem(r, 422)


async def test_dns_and_ip_patterns_never_cross(orchestrator_with: Orchestrator) -> None:
    async with orchestrator_with("10.0.0.0/8, *.internal") as client:
        ok = {"base_url": "http://10.1.2.3:8080"}
        assert (await client.put("/v1/services/a", json=ok)).status_code == 201
        assert (
            await client.put("/v1/services/b", json={"base_url": "http://pay.internal"})
        ).status_code == 201
        # A name that merely starts like an address: no DNS pattern names it, and it
        # does not resolve into 10.0.0.0/8 (`.invalid` never resolves, RFC 6761).
        for url in ("http://10.0.0.attacker.invalid", "http://10.0.0.1.invalid"):
            problem = assert_problem(
                await client.put("/v1/services/c", json={"base_url": url}), 422
            )
            assert "base_url" in str(problem["errors"])
        # An address outside every IP entry, and one a DNS pattern cannot allow.
        for url in ("http://192.168.1.1", "http://11.0.0.1"):
            assert_problem(await client.put("/v1/services/d", json={"base_url": url}), 422)
    async with orchestrator_with("10.0.0.*") as client:  # a DNS pattern: no address
        for url in ("http://10.0.0.1", "http://10.0.0.attacker.invalid"):
            assert_problem(await client.put("/v1/services/e", json={"base_url": url}), 422)


async def test_a_name_that_resolves_to_a_refused_address_is_blocked_at_call_time(
    orchestrator_with: Orchestrator, participant_port: tuple[Participant, int]
) -> None:
    participant, port = participant_port
    resolver = Resolver({"pay.example.test": [[METADATA]]})
    async with orchestrator_with("*", resolver) as client:
        await put_service(client, f"http://pay.example.test:{port}")
        await define(client, "meta", [step("a")])
        saga = await run(client, "meta", {})
    a = step_of(saga, "a")
    assert saga["status"] == "compensated", saga
    assert a["attempts"] == 1 and a["last_error"]["kind"] == "blocked", a
    assert "metadata" in a["last_error"]["message"]
    assert participant.calls == [], "nothing may be sent to a refused address"
    assert saga["error"]["kind"] == "blocked"


async def test_every_resolved_address_is_checked(
    orchestrator_with: Orchestrator, participant_port: tuple[Participant, int]
) -> None:
    participant, port = participant_port
    resolver = Resolver({"mixed.example.test": [[LOOPBACK, METADATA]]})
    async with orchestrator_with("*", resolver) as client:
        await put_service(client, f"http://mixed.example.test:{port}")
        await define(client, "mixed", [step("a", compensate=False)])
        saga = await run(client, "mixed", {})
    assert step_of(saga, "a")["last_error"]["kind"] == "blocked", saga
    assert participant.calls == []


async def test_the_connection_goes_to_the_checked_address_with_the_name_kept(
    orchestrator_with: Orchestrator, participant_port: tuple[Participant, int]
) -> None:
    participant, port = participant_port
    resolver = Resolver({"pay.example.test": [[LOOPBACK]]})
    async with orchestrator_with("*.example.test", resolver) as client:
        await put_service(client, f"http://pay.example.test:{port}")
        await define(client, "pinned", [step("a", compensate=False)])
        saga = await run(client, "pinned", {})
    assert saga["status"] == "completed", saga
    (call,) = participant.calls
    assert call.headers["host"] == f"pay.example.test:{port}"  # the name, not the address
    assert resolver.asked == ["pay.example.test"]


async def test_a_name_whose_resolution_changes_is_checked_at_each_connect(
    orchestrator_with: Orchestrator, participant_port: tuple[Participant, int]
) -> None:
    """DNS rebinding: the first resolution is safe, the next points at the metadata
    address. The check and the connect use one resolution, so the second connection is
    refused before it is made, and the first one went to the checked address."""
    participant, port = participant_port
    participant.always("/a", Reply(200, {"id": "x"}, {"Connection": "close"}))
    resolver = Resolver({"rebind.example.test": [[LOOPBACK], [METADATA]]})
    async with orchestrator_with("*", resolver) as client:
        await put_service(client, f"http://rebind.example.test:{port}")
        await define(client, "rebind", [step("a", compensate=False)])
        first = await run(client, "rebind", {})
        second = await run(client, "rebind", {})
    assert first["status"] == "completed", first
    assert step_of(second, "a")["last_error"]["kind"] == "blocked", second
    assert len(participant.calls) == 1
    assert resolver.asked == ["rebind.example.test", "rebind.example.test"]


async def test_redirects_are_not_followed(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.always(
        "/a", Reply(302, {"moved": True}, {"Location": "http://169.254.169.254/latest/meta-data"})
    )
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "redirected", [step("a", compensate=False)])
    saga = await run(orchestrator, "redirected", {})
    a = step_of(saga, "a")
    assert a["status_code"] == 302 and a["last_error"]["kind"] == "http_status", a
    assert [c.path for c in participant.calls] == ["/a"]


@pytest.mark.parametrize(
    ("value", "raw"),
    [
        ("../../admin/wipe?all=1#", b"/o/%2E%2E%2F%2E%2E%2Fadmin%2Fwipe%3Fall%3D1%23/s"),
        ("..", b"/o/%2E%2E/s"),
        ("%2e%2e%2f", b"/o/%252e%252e%252f/s"),
        ("..\\..\\x", b"/o/%2E%2E%5C%2E%2E%5Cx/s"),
        ("a/b", b"/o/a%2Fb/s"),
        ("\u2025", b"/o/%E2%80%A5/s"),  # a two-dot leader is not a dot
        ("q?x=1", b"/o/q%3Fx%3D1/s"),
    ],
)
async def test_traversal_payloads_stay_in_their_segment(
    orchestrator: httpx.AsyncClient, participant: Participant, value: str, raw: bytes
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "segments",
        [step("a", path="/o/${input.v}/s?tag=${input.v}", compensate=False)],
    )
    saga = await run(orchestrator, "segments", {"v": value})
    assert saga["status"] == "completed", saga
    (call,) = participant.calls
    assert call.raw_path == raw, call.raw_path


# --- completion notifications ----------------------------------------------------------


async def test_a_notify_target_the_policy_refuses_is_refused_at_start(
    orchestrator_with: Orchestrator, participant_port: tuple[Participant, int]
) -> None:
    participant, _port = participant_port
    async with orchestrator_with("127.0.0.1") as client:
        await put_service(client, participant.url)
        await define(client, "n", [step("a")])
        for url in ("http://169.254.169.254/latest", "http://10.0.0.5/hooks"):
            r = await client.post("/v1/sagas", json={"definition": "n", "notify": {"url": url}})
            problem = assert_problem(r, 422)
            assert problem["type"].endswith("host-not-allowed"), problem
            assert ["body", "notify", "url"] in [e["loc"] for e in problem["errors"]]
        doc = {"name": "m", "steps": [step("a")], "notify": {"url": "http://10.0.0.5/h"}}
        assert_problem(await client.post("/v1/definitions", json=doc), 422)


async def test_a_notify_target_resolving_to_a_refused_address_fails_without_a_crash(
    orchestrator_with: Orchestrator, participant_port: tuple[Participant, int]
) -> None:
    participant, port = participant_port
    resolver = Resolver({"hooks.example.test": [[METADATA]]})
    async with orchestrator_with("*", resolver) as client:
        await put_service(client, participant.url)
        await define(client, "n", [step("a")])
        notify = {"url": f"http://hooks.example.test:{port}/hooks"}
        r = await client.post("/v1/sagas", json={"definition": "n", "notify": notify})
        assert r.status_code == 201, r.text
        saga_id = r.json()["id"]
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            saga = (await client.get(f"/v1/sagas/{saga_id}")).json()
            if saga["notification"]["status"] != "pending":
                break
            assert asyncio.get_running_loop().time() < deadline, saga
            await asyncio.sleep(0.1)
        assert saga["status"] == "completed"
        assert saga["notification"] == {"status": "failed", "attempts": 1}
        assert participant.to("/hooks") == [], "nothing may be sent to a refused address"
        r = await client.get(
            "/v1/admin/dead-letters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        (letter,) = [d for d in r.json()["items"] if d["saga_id"] == saga_id]
        assert letter["direction"] == "notify"
        assert letter["last_error"]["kind"] == "blocked", letter
        # The executor goes on: the next saga is served.
        r = await client.post("/v1/sagas", json={"definition": "n"})
        after = await client.get(f"/v1/sagas/{r.json()['id']}", params={"wait_seconds": 10})
        assert after.json()["status"] == "completed"
