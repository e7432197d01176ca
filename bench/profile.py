"""Where `serve` spends its CPU under load: py-spy on a running service, summarised.

    .venv/bin/python bench/profile.py [--seconds 20] [--callers 32] [--top 40]

Starts the participant and `saga-orchestrator serve` on a fresh database of the server
at BENCH_DATABASE_URL (default: the local one, postgresql://postgres@127.0.0.1:5432),
drives it with callers that start sagas and long-poll them (as bench/run.py does), and
samples the service with `py-spy record --format raw`. Prints the functions by own time
and by total time (percent of samples), and writes the raw profile and a speedscope file
to bench/results/. Everything it starts is stopped at the end, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.systems import DEFINITIONS, SERVICES
from tests.support.servers import free_port

BENCH = Path(__file__).resolve().parent
PYTHON = Path(sys.executable)
TOKEN = "bench-profile-token-0123456789"


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise TimeoutError(url)


async def _drive(base: str, callers: int, seconds: float) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
            while time.monotonic() < stop:
                r = await client.post(
                    "/v1/sagas",
                    json={"definition": DEFINITIONS[0]["name"], "input": {}},
                    headers={"Idempotency-Key": uuid.uuid4().hex},
                )
                saga = r.json()
                while saga["status"] not in ("completed", "compensated", "failed"):
                    saga = (
                        await client.get(f"/v1/sagas/{saga['id']}", params={"wait_seconds": 30})
                    ).json()
                done += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return done


def _summary(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    out = [f"{samples} samples"]
    for title, counter in (("own time", own), ("total time (inclusive)", total)):
        out.append(f"\n--- by {title} ---")
        for frame, count in counter.most_common(top):
            out.append(f"{100 * count / samples:5.1f}%  {frame}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(PYTHON.parent / "py-spy")
    server = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_profile_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = server.rsplit("/", 1)[0] + "/" + name
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log = results / f"profile-{stamp}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(
        DATABASE_URL=db_url,
        SAGA_ADMIN_TOKEN=TOKEN,
        SAGA_API_TOKEN=TOKEN,
        SAGA_LOG_LEVEL="WARNING",
        SAGA_ALLOWED_HOSTS="127.0.0.1",
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        p_port, s_port = free_port(), free_port()
        procs.append(
            _start([str(PYTHON), str(BENCH / "participant.py"), "--port", str(p_port)], env, log)
        )
        serve = _start([str(PYTHON), "-m", "app", "serve", "--port", str(s_port)], env, log)
        procs.append(serve)
        base = f"http://127.0.0.1:{s_port}"
        _wait_http(f"{base}/readyz")
        _wait_http(f"http://127.0.0.1:{p_port}/a")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for svc in SERVICES:
            httpx.put(
                f"{base}/v1/services/{svc}",
                json={"base_url": f"http://127.0.0.1:{p_port}", "max_concurrency": 64},
                headers=headers,
            ).raise_for_status()
        httpx.post(
            f"{base}/v1/definitions", json=DEFINITIONS[0], headers=headers
        ).raise_for_status()
        asyncio.run(_drive(base, args.callers, 3))  # warm-up
        raw = results / f"profile-{stamp}.txt"
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(serve.pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        began = time.monotonic()
        done = asyncio.run(_drive(base, args.callers, args.seconds))
        spy.wait(timeout=60)
        took = time.monotonic() - began
        print(f"{done} sagas in {took:.1f}s ({done / took:.1f}/s) at {args.callers} callers")
        print(_summary(raw, args.top))
        print(f"raw profile: {raw}")
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
