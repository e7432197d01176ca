"""A short soak, so the long one (`tasks.py chaos`) keeps working: nothing lost, no 5xx,
connections bounded, memory not running away."""

from __future__ import annotations

from tests.chaos.soak import soak


async def test_short_soak_loses_nothing_and_stays_bounded() -> None:
    figures = await soak(minutes=0.4, rate=8, seed=3)
    assert figures["lost"] == 0, figures
    assert figures["server_errors"] == 0, figures
    assert figures["sagas"] > 50, figures
    assert figures["connections_max"] <= 60, figures
    # Memory: no process doubles in under half a minute of steady traffic.
    for start, end in zip(figures["rss_kib_start"], figures["rss_kib_end"], strict=True):
        assert end < 2 * start + 50_000, figures
