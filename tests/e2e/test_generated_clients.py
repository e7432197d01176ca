"""Clients generated from the served OpenAPI document work.

- Python: openapi-python-client generates a package into a temporary directory, with
  no warning (a piece it could not generate is a warning), and that package runs the
  quickstart flow against a live orchestrator: register a service, define a saga (one
  call to the service, one to an absolute URL), start it twice with one
  Idempotency-Key (the same saga), long-poll it to its end, read its events, cancel
  (409 once it is done; a running one compensates with a typed `SagaError`).
- TypeScript: `npx openapi-typescript` turns the document into types without errors,
  and `tsc --strict` accepts them (skipped, with the reason, where npm is absent).

app/client.py stays the Python client to use; these prove the document is enough for
any other language.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.support.servers import Participant, Reply

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PACKAGE = "saga_orchestrator_api"


async def _document(client: httpx.AsyncClient, where: Path) -> Path:
    r = await client.get("/openapi.json")
    assert r.status_code == 200, r.text
    path = where / "openapi.json"
    path.write_text(r.text)
    return path


def _generate(document: Path, where: Path) -> str:
    config = where / "openapi-python-client.json"
    config.write_text(json.dumps({"post_hooks": [], "project_name_override": PACKAGE}))
    done = subprocess.run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(document),
            "--meta",
            "none",
            "--config",
            str(config),
            "--output-path",
            str(where / PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Any]:
    """Import the package generated in tmp_path (then forget it)."""

    def load() -> ModuleType:
        sys.path.insert(0, str(tmp_path))
        importlib.invalidate_caches()
        return importlib.import_module(PACKAGE)

    yield load
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def _api(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.api.{name}")


async def test_generated_python_client_runs_the_quickstart(
    orchestrator: httpx.AsyncClient,
    participant: Participant,
    tmp_path: Path,
    generated: Any,
) -> None:
    document = await _document(orchestrator, tmp_path)
    output = await asyncio.to_thread(_generate, document, tmp_path)
    assert "Warning" not in output and "Unable to" not in output, output
    package = generated()
    assert sorted(p.name for p in (tmp_path / PACKAGE / "api").iterdir() if p.is_dir()) == [
        "admin",
        "callbacks",
        "definitions",
        "operations",
        "sagas",
        "services",
    ]
    models = importlib.import_module(f"{PACKAGE}.models")
    register_service = _api("services.register_service")
    register_definition = _api("definitions.register_definition")
    start_saga = _api("sagas.start_saga")
    get_saga = _api("sagas.get_saga")
    list_events = _api("sagas.list_saga_events")
    cancel_saga = _api("sagas.cancel_saga")

    participant.always("/charges", Reply(201, {"id": "ch_1"}))
    async with package.Client(base_url=str(orchestrator.base_url)) as api:
        r = await register_service.asyncio_detailed(
            "payments", client=api, body=models.ServiceSpec(base_url=participant.url)
        )
        assert r.status_code == 201, r.content
        assert isinstance(r.parsed, models.ServiceOut) and r.parsed.circuit_state == "closed"

        charge = models.ServiceCall(
            service="payments",
            path="/charges",
            body={"amount": "${input.amount}", "order_ref": "${saga.id}"},
        )
        refund = models.ServiceCall(
            service="payments", path="/refunds", body={"charge_id": "${steps.charge.response.id}"}
        )
        order = models.UrlCall(
            url=participant.url + "/orders/${saga.id}", method=models.UrlCallMethod.PUT
        )
        spec = models.DefinitionSpec(
            name="checkout",
            steps=[
                models.StepSpec(name="charge", action=charge, compensation=refund),
                models.StepSpec(name="order", action=order),
            ],
        )
        r = await register_definition.asyncio_detailed(client=api, body=spec)
        assert r.status_code == 201, r.content
        # An answer carries all three target fields (null for the unused ones), and the
        # generated union does not tell the shapes apart by type: read the fields.
        actions = [step.action for step in r.parsed.steps]
        assert [(a.service, a.path, a.url) for a in actions] == [
            ("payments", "/charges", None),
            (None, None, order.url),
        ]

        body = models.SagaStart(definition="checkout", input_={"amount": 42})
        first = await start_saga.asyncio_detailed(client=api, body=body, idempotency_key="o-1")
        again = await start_saga.asyncio_detailed(client=api, body=body, idempotency_key="o-1")
        assert (first.status_code, again.status_code) == (201, 200), (first, again)
        assert again.headers["Idempotent-Replayed"] == "true"
        saga_id = first.parsed.id
        assert again.parsed.id == saga_id
        assert first.headers["Location"] == f"/v1/sagas/{saga_id}"

        saga = None
        for _ in range(10):
            saga = await get_saga.asyncio(saga_id, client=api, wait_seconds=10)
            if saga.status in ("completed", "compensated", "failed"):
                break
        assert isinstance(saga, models.SagaOut) and saga.status == "completed", saga
        assert saga.error is None
        assert saga.steps[0].response == {"id": "ch_1"}

        events = await list_events.asyncio(saga_id, client=api)
        assert isinstance(events, models.PageEventOut), events
        kinds = [e.type_ for e in events.items]
        assert kinds[0] == "saga_started" and kinds[-1] == "saga_completed", kinds

        done = await cancel_saga.asyncio_detailed(saga_id, client=api)
        assert done.status_code == 409 and isinstance(done.parsed, models.Problem), done
        assert done.parsed.type_.endswith(":saga-terminal")

        participant.script("/charges", Reply(201, {"id": "ch_2"}, delay=1.5))
        running = await start_saga.asyncio(client=api, body=body, idempotency_key="o-2")
        cancelled = await cancel_saga.asyncio_detailed(running.id, client=api)
        assert cancelled.status_code == 202, cancelled.content
        assert cancelled.parsed.cancel_requested is True
        for _ in range(10):
            saga = await get_saga.asyncio(running.id, client=api, wait_seconds=10)
            if saga.status in ("completed", "compensated", "failed"):
                break
        assert saga.status == "compensated", saga
        assert isinstance(saga.error, models.SagaError)
        assert saga.error.kind == models.ErrorKind.CANCELLED
    assert len(participant.to("/refunds")) == 1


async def test_typescript_types_compile(api: httpx.AsyncClient, tmp_path: Path) -> None:
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("npm is not installed here (npx not on PATH); CI has it")
    document = await _document(api, tmp_path)
    types = tmp_path / "api.d.ts"
    for command in (
        [npx, "--yes", "openapi-typescript@7", str(document), "-o", str(types)],
        [npx, "--yes", "-p", "typescript@5", "tsc", "--noEmit", "--strict", str(types)],
    ):
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "error" not in output.lower() and "warn" not in output.lower(), output
    text = types.read_text()
    for name in ("startSaga: {", "SagaError: {", "ServiceCall: {", "UrlCall: {"):
        assert name in text, name
