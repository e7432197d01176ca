"""The shortest end-to-end path: register, start, finish."""

from __future__ import annotations

import httpx

from tests.conftest import wait_terminal
from tests.support.servers import Participant


async def test_two_step_saga_completes(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    r = await orchestrator.put("/v1/services/pay", json={"base_url": participant.url})
    assert r.status_code == 201, r.text
    r = await orchestrator.post(
        "/v1/definitions",
        json={
            "name": "flow",
            "steps": [
                {"name": "a", "action": {"service": "pay", "path": "/a", "body": "${input}"}},
                {
                    "name": "b",
                    "action": {
                        "service": "pay",
                        "path": "/b",
                        "body": {"from_a": "${steps.a.response.id}"},
                    },
                },
            ],
        },
    )
    assert r.status_code == 201, r.text
    r = await orchestrator.post("/v1/sagas", json={"definition": "flow", "input": {"x": 1}})
    assert r.status_code == 201, r.text
    saga = await wait_terminal(orchestrator, r.json()["id"])
    assert saga["status"] == "completed"
    assert [s["status"] for s in saga["steps"]] == ["succeeded", "succeeded"]
    (b_call,) = participant.to("/b")
    assert b_call.body == {"from_a": saga["steps"][0]["response"]["id"]}
