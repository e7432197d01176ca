"""Serve the four checkout participants: `python -m examples.checkout [--port 9001]`.

payments, orders, inventory and notifications listen on PORT, PORT+1, PORT+2, PORT+3.
They keep their effects in DATABASE_URL when it is set, else in an embedded PostgreSQL
under ./.saga/examples. Ctrl-C or SIGTERM stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import uvicorn

from examples.checkout import FACTORIES


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the runner owns the signals
        pass


async def _serve(dsn: str, port: int) -> None:
    servers = []
    for offset, (name, factory) in enumerate(FACTORIES.items()):
        config = uvicorn.Config(
            factory(dsn), host="127.0.0.1", port=port + offset, log_level="warning"
        )
        servers.append((name, port + offset, _Server(config)))
    tasks = [asyncio.create_task(server.serve()) for _, _, server in servers]
    while not all(server.started for _, _, server in servers):
        if any(task.done() for task in tasks):
            for task in tasks:
                if task.done():
                    task.result()
        await asyncio.sleep(0.05)
    for name, p, _ in servers:
        print(f"{name:<14} http://127.0.0.1:{p}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for _, _, server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.checkout", description=__doc__)
    parser.add_argument("--port", type=int, default=9001, help="first port (default 9001)")
    args = parser.parse_args()
    dsn = os.environ.get("DATABASE_URL")
    embedded: Any = None
    if not dsn:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        data = Path(".saga/examples").resolve()
        data.mkdir(parents=True, exist_ok=True)
        embedded = pgserver.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]
        dsn = embedded.get_uri()
    try:
        asyncio.run(_serve(dsn, args.port))
    finally:
        if embedded is not None:
            embedded.cleanup()


if __name__ == "__main__":
    main()
