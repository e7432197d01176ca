"""System C: the same three-step saga as a DBOS Transact workflow, served over HTTP.

    bench/.dbos-venv/bin/python bench/dbos_app.py --port P --db URL --participant URL

Runs in its own virtualenv (bench/dbos-requirements.txt pins DBOS), one process:

- `POST /start` (optional `Idempotency-Key` header: the workflow id, DBOS's own
  idempotency) starts `saga`, a `@DBOS.workflow` calling three `@DBOS.step`s, each a
  POST to the participant through one pooled HTTP client (bench/post.py: aiohttp, or
  httpx with `--client httpx`); answers `{"id": ...}`.
- `GET /result/{id}` waits up to 30 s for the workflow's result: `{"status":
  "completed"}`, `"failed"`, or `"pending"` when the time is up (the caller asks again).
  It awaits the handle that `start_workflow_async` returned (in-process, no polling),
  else the handle `retrieve_workflow_async` gives.

DBOS keeps its state in the system database given with `--db`; it has no separate
application database here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from dbos import DBOS, DBOSConfig, SetWorkflowID
from fastapi import FastAPI, Header

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.post import CLIENTS, Post

PARTICIPANT = ""
POST = Post("aiohttp")
_handles: dict[str, Any] = {}


async def _call(step: str) -> dict[str, Any]:
    workflow_id = DBOS.workflow_id
    body: dict[str, Any] = await POST(
        f"{PARTICIPANT}/{step}",
        {"saga": workflow_id},
        {"Idempotency-Key": f"{workflow_id}:{step}:action"},
    )
    return body


@DBOS.step()
async def step_a() -> dict[str, Any]:
    return await _call("a")


@DBOS.step()
async def step_b() -> dict[str, Any]:
    return await _call("b")


@DBOS.step()
async def step_c() -> dict[str, Any]:
    return await _call("c")


@DBOS.workflow()
async def saga() -> str:
    await step_a()
    await step_b()
    await step_c()
    return "completed"


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    DBOS.launch()
    try:
        yield
    finally:
        await POST.aclose()
        DBOS.destroy()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/start")
async def start(idempotency_key: str | None = Header(default=None)) -> dict[str, str]:
    if idempotency_key:
        with SetWorkflowID(idempotency_key):
            handle = await DBOS.start_workflow_async(saga)
    else:
        handle = await DBOS.start_workflow_async(saga)
    _handles[handle.workflow_id] = handle
    return {"id": handle.workflow_id}


@app.get("/result/{workflow_id}")
async def result(workflow_id: str) -> dict[str, str]:
    handle = _handles.get(workflow_id)
    if handle is None:
        handle = await DBOS.retrieve_workflow_async(workflow_id)
    try:
        outcome = await asyncio.wait_for(handle.get_result(), timeout=30)
    except TimeoutError:
        return {"id": workflow_id, "status": "pending"}
    except Exception as exc:
        _handles.pop(workflow_id, None)
        return {"id": workflow_id, "status": "failed", "error": repr(exc)}
    _handles.pop(workflow_id, None)
    return {"id": workflow_id, "status": str(outcome)}


def main() -> None:
    global PARTICIPANT, POST
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="the system database's URL")
    parser.add_argument("--participant", required=True)
    parser.add_argument("--client", choices=CLIENTS, default="aiohttp")
    args = parser.parse_args()
    PARTICIPANT = args.participant
    POST = Post(args.client)
    config: DBOSConfig = {
        "name": "saga-bench",
        "system_database_url": args.db,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
