"""The baselines' participant calls: one pooled HTTP client, aiohttp or httpx.

The floor and the DBOS app call the participant with the library the service itself
uses, aiohttp, so that the ratios compare orchestration and not HTTP clients; `httpx` is
the client they were first measured with (about ten times aiohttp's CPU per request on
this machine). Imports only the library it is asked for: the DBOS app's virtualenv has
both, pinned in dbos-requirements.txt.
"""

from __future__ import annotations

from typing import Any

CLIENTS = ("aiohttp", "httpx")


class Post:
    """POST a JSON body; the JSON answer (an error status raises)."""

    def __init__(self, client: str) -> None:
        self.client = client
        self._session: Any = None

    async def __call__(self, url: str, body: Any, headers: dict[str, str]) -> Any:
        if self.client == "httpx":
            import httpx

            if self._session is None:
                limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
                self._session = httpx.AsyncClient(timeout=10, limits=limits)
            response = await self._session.post(url, json=body, headers=headers)
            response.raise_for_status()
            return response.json()
        import aiohttp

        if self._session is None:  # bound to the running loop: made on first use
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256),
                timeout=aiohttp.ClientTimeout(total=10),
            )
        async with self._session.post(url, json=body, headers=headers) as response:
            response.raise_for_status()
            return await response.json()

    async def aclose(self) -> None:
        if self._session is not None:
            if self.client == "httpx":
                await self._session.aclose()
            else:
                await self._session.close()
