"""System D, the hand-rolled floor: what a saga costs with nothing but the essentials.

    python bench/floor.py --db URL --participant http://127.0.0.1:P

One process. Per saga, five autocommit statements with psycopg (insert the saga row;
one update after each of the three steps' HTTP calls, recording its response; one final
update) and three calls to the participant through one pooled HTTP client: aiohttp, the
library the service calls participants with (`--client httpx`: one `httpx.AsyncClient`,
as this floor was first measured). No API, no retries, no leases, no compensation. Its
callers are asyncio tasks inside it (each with its own connection), driven by
bench/protocol.py on stdin/stdout like the HTTP driver, so its CPU figure includes its
own callers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.post import CLIENTS, Post
from bench.protocol import RunOne, serve

SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_sagas (
    id uuid PRIMARY KEY,
    status text NOT NULL,
    step int NOT NULL DEFAULT 0,
    input jsonb NOT NULL,
    responses jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
STEPS = ("a", "b", "c")


class Floor:
    def __init__(self, db: str, participant: str, client: str) -> None:
        self.db = db
        self.participant = participant
        self.post = Post(client)

    async def setup(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.db, autocommit=True) as conn:
            await conn.execute(SCHEMA)

    @contextlib.asynccontextmanager
    async def caller(self, _: Mapping[str, Any]) -> AsyncIterator[RunOne]:
        async with await psycopg.AsyncConnection.connect(self.db, autocommit=True) as conn:

            async def run_one() -> str:
                saga_id = uuid.uuid4()
                await conn.execute(
                    "INSERT INTO floor_sagas (id, status, input) VALUES (%s, 'running', %s)",
                    (saga_id, json.dumps({"order": saga_id.hex})),
                )
                for index, step in enumerate(STEPS, start=1):
                    answer = await self.post(
                        f"{self.participant}/{step}",
                        {"saga": str(saga_id)},
                        {"Idempotency-Key": f"{saga_id}:{step}:action"},
                    )
                    await conn.execute(
                        "UPDATE floor_sagas SET step = %s, updated_at = now(),"
                        " responses = responses || %s::jsonb WHERE id = %s",
                        (index, json.dumps([answer]), saga_id),
                    )
                await conn.execute(
                    "UPDATE floor_sagas SET status = 'completed', updated_at = now() WHERE id = %s",
                    (saga_id,),
                )
                return "completed"

            yield run_one


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--participant", required=True)
    parser.add_argument("--client", choices=CLIENTS, default="aiohttp")
    args = parser.parse_args()
    floor = Floor(args.db, args.participant, args.client)
    await floor.setup()
    try:
        await serve(floor.caller)
    finally:
        await floor.post.aclose()


if __name__ == "__main__":
    asyncio.run(main())
