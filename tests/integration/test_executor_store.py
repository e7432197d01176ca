"""The executor's statements against a real database: index use, pruning, key expiry."""

from __future__ import annotations

import httpx
import psycopg

from app.engine.ports import Lease
from app.store.db import make_engine
from app.store.repository import PgSagaRepository

SEED = """
INSERT INTO definitions (name, version, content_hash, spec)
VALUES ('flow', 1, 'h', '{"name": "flow", "steps": []}');
INSERT INTO sagas (id, definition_id, definition_name, definition_version, status, input,
                   finished_at, due_at)
SELECT gen_random_uuid(), 1, 'flow', 1, 'completed', '{}', now(), NULL
  FROM generate_series(1, 20000);
INSERT INTO sagas (id, definition_id, definition_name, definition_version, status, input, due_at)
SELECT gen_random_uuid(), 1, 'flow', 1, 'running', '{}', now() - interval '1 second'
  FROM generate_series(1, 20);
ANALYZE sagas;
"""


def test_claim_walks_the_partial_due_index_not_the_history(db_url: str) -> None:
    """20,000 finished sagas must not be scanned to find 20 due ones."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SEED)
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN SELECT id FROM sagas WHERE due_at <= now() ORDER BY due_at "
                "LIMIT 32 FOR UPDATE SKIP LOCKED"
            )
        )
    assert "ix_sagas_due" in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_claim_takes_each_due_saga_once_and_fences_the_rest(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SEED)
    engine = make_engine(db_url)
    try:
        first, second = PgSagaRepository(engine, "w1", 30), PgSagaRepository(engine, "w2", 30)
        got_first = await first.claim(15)
        got_second = await second.claim(15)
        assert len(got_first) == 15 and len(got_second) == 5
        ids_first = {c.lease.saga_id for c in got_first}
        assert not ids_first & {c.lease.saga_id for c in got_second}
        assert await second.claim(10) == []  # leased sagas are not due
        lease = got_first[0].lease
        assert await first.renew(lease)
        assert not await second.renew(lease)  # not its lease
        assert not await first.renew(Lease(lease.saga_id, lease.epoch + 1))  # a stale epoch
    finally:
        await engine.dispose()


async def test_expired_idempotency_keys_are_pruned_and_can_be_reused(
    db_url: str, api: httpx.AsyncClient
) -> None:
    r = await api.put("/v1/services/svc", json={"base_url": "http://127.0.0.1:9"})
    assert r.status_code == 201
    r = await api.post(
        "/v1/definitions",
        json={"name": "flow", "steps": [{"name": "a", "action": {"service": "svc", "path": "/a"}}]},
    )
    assert r.status_code == 201
    first = await api.post(
        "/v1/sagas", json={"definition": "flow", "input": {}}, headers={"Idempotency-Key": "old"}
    )
    kept = await api.post(
        "/v1/sagas", json={"definition": "flow", "input": {}}, headers={"Idempotency-Key": "new"}
    )
    assert first.status_code == kept.status_code == 201
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE idempotency_keys SET expires_at = now() - interval '1 hour' WHERE key = 'old'"
        )
    # An expired key is taken over by a new request even before pruning...
    again = await api.post(
        "/v1/sagas",
        json={"definition": "flow", "input": {"x": 1}},
        headers={"Idempotency-Key": "old"},
    )
    assert again.status_code == 201, again.text
    assert again.json()["id"] != first.json()["id"]
    # ...and pruning removes only expired keys.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE idempotency_keys SET expires_at = now() - interval '1 hour' WHERE key = 'old'"
        )
    engine = make_engine(db_url)
    try:
        assert await PgSagaRepository(engine, "w", 30).prune_idempotency_keys() == 1
    finally:
        await engine.dispose()
    with psycopg.connect(db_url) as conn:
        keys = {row[0] for row in conn.execute("SELECT key FROM idempotency_keys")}
    assert keys == {"new"}
