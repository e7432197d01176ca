"""The participant every system under test calls, in its own process.

    python bench/participant.py --port P [--slow-seconds 5]

Any POST answers 200 at once with a small JSON body (`{"id": "..."}`): `/a`, `/b`,
`/c` and their compensations `/a/undo` ... . A POST to `/slow...` answers after
`--slow-seconds` (the in-flight scenario). `GET /stats` tells how many calls arrived and
how many `/slow` calls were in flight at most since the last `GET /stats?reset=1`.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class Stats:
    calls = 0
    slow_in_flight = 0
    slow_max_in_flight = 0


def build(slow_seconds: float) -> Starlette:
    async def call(request: Request) -> JSONResponse:
        await request.body()
        Stats.calls += 1
        if request.path_params["path"].startswith("slow"):
            Stats.slow_in_flight += 1
            Stats.slow_max_in_flight = max(Stats.slow_max_in_flight, Stats.slow_in_flight)
            try:
                await asyncio.sleep(slow_seconds)
            finally:
                Stats.slow_in_flight -= 1
        return JSONResponse({"id": uuid.uuid4().hex})

    async def stats(request: Request) -> JSONResponse:
        body = {
            "calls": Stats.calls,
            "slow_in_flight": Stats.slow_in_flight,
            "slow_max_in_flight": Stats.slow_max_in_flight,
        }
        if request.query_params.get("reset"):
            Stats.calls = 0
            Stats.slow_max_in_flight = Stats.slow_in_flight
        return JSONResponse(body)

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/healthz", health),
            Route("/stats", stats),
            Route("/{path:path}", call, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    args = parser.parse_args()
    uvicorn.run(
        build(args.slow_seconds),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
