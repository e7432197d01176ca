"""Counters read before and after a measurement window, and what a window's figures are.

- Processes: utime+stime from /proc/<pid>/stat and VmHWM/VmRSS from /proc/<pid>/status,
  summed over every process in the system's process groups.
- The database: `pg_snapshot_xmax(pg_current_snapshot())` (the next transaction id; the
  read itself assigns none), `sum(calls)` of pg_stat_statements for the system's
  databases, the WAL position, and the CPU of the server's own processes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def group_members(pgids: Iterable[int]) -> list[int]:
    """Every live process whose process group is one of `pgids`."""
    wanted = set(pgids)
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # After the name: state, ppid, pgrp, ...
        if fields is not None and int(fields[2]) in wanted:
            members.append(int(entry.name))
    return members


def children(pid: int) -> list[int]:
    """`pid` and its direct children (PostgreSQL's backends each lead their own group)."""
    out = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def machine_ticks() -> tuple[int, int, int]:
    """(busy, total, steal) clock ticks of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    total = sum(values[:8])
    return total - idle, total, steal


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """utime + stime of each process (all its threads), in seconds."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields 14 and 15 of stat(5); index 0 here is field 3 (state).
            out[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two readings; a process born in between counts from zero."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib(pids: Iterable[int]) -> int:
    """Sum of each process's high-water resident set (VmHWM)."""
    return sum(_status_kib(pid, "VmHWM") for pid in pids)


def rss_kib(pids: Iterable[int]) -> int:
    return sum(_status_kib(pid, "VmRSS") for pid in pids)


@dataclass
class Reading:
    at: float
    cpu: dict[str, dict[int, float]]  # per group of processes ("system", "driver", ...)
    db_cpu: dict[int, float]
    machine: tuple[int, int, int]
    xid: int
    statements: int
    statements_evicted: int
    wal_lsn: int


@dataclass
class Monitor:
    """One autocommit connection to the `postgres` database of the benchmark server."""

    url: str
    server_pid: int
    conn: psycopg.Connection[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.conn = psycopg.connect(self.url, autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def read(self, groups: Mapping[str, Sequence[int]], databases: Sequence[str]) -> Reading:
        """`groups`: name -> process groups whose CPU to read (at least "system")."""
        at = time.monotonic()
        machine = machine_ticks()
        cpu = {name: cpu_seconds(group_members(pgids)) for name, pgids in groups.items()}
        row = self.conn.execute(
            """
            SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                   (SELECT coalesce(sum(s.calls), 0)::bigint
                      FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                     WHERE d.datname = ANY(%s)),
                   (SELECT dealloc FROM pg_stat_statements_info),
                   pg_current_wal_lsn() - '0/0'::pg_lsn
            """,
            (list(databases),),
        ).fetchone()
        assert row is not None
        db_cpu = cpu_seconds(children(self.server_pid))
        return Reading(at, cpu, db_cpu, machine, int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


Record = tuple[float, float, str]  # started, finished (time.monotonic, shared by processes), status


def window_figures(
    records: Sequence[Sequence[Any]], before: Reading, after: Reading, errors: int
) -> dict[str, Any]:
    """The figures of one window: sagas that finished between the two readings."""
    inside = [r for r in records if before.at <= r[1] <= after.at]
    seconds = after.at - before.at
    sagas = len(inside)
    latencies = sorted((r[1] - r[0]) * 1000 for r in inside)
    statuses: dict[str, int] = {}
    for r in inside:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1

    def per_saga(value: float) -> float:
        return value / sagas if sagas else math.nan

    busy = after.machine[0] - before.machine[0]
    other = (
        busy / CLOCK_TICKS
        - cpu_delta(before.db_cpu, after.db_cpu)
        - sum(cpu_delta(before.cpu.get(n, {}), c) for n, c in after.cpu.items())
    )
    total = after.machine[1] - before.machine[1]
    steal = after.machine[2] - before.machine[2]
    others = {
        f"{name}_cpu_ms_per_saga": per_saga(cpu_delta(before.cpu.get(name, {}), cpu) * 1000)
        for name, cpu in after.cpu.items()
        if name != "system"
    }

    return {
        "seconds": round(seconds, 3),
        "sagas": sagas,
        "statuses": statuses,
        "errors": errors,
        "sagas_per_s": sagas / seconds if seconds > 0 else math.nan,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "mean_ms": sum(latencies) / sagas if sagas else math.nan,
        "max_ms": latencies[-1] if latencies else math.nan,
        "xids": after.xid - before.xid,
        "xids_per_saga": per_saga(after.xid - before.xid),
        "statements": after.statements - before.statements,
        "statements_per_saga": per_saga(after.statements - before.statements),
        # Non-zero: pg_stat_statements evicted entries and the statement count is low.
        "statements_evicted": after.statements_evicted - before.statements_evicted,
        "cpu_ms_per_saga": per_saga(cpu_delta(before.cpu["system"], after.cpu["system"]) * 1000),
        "db_cpu_ms_per_saga": per_saga(cpu_delta(before.db_cpu, after.db_cpu) * 1000),
        **others,
        # CPU of everything else on the machine (other processes, the kernel): noise.
        "other_cpu_ms_per_saga": per_saga(other * 1000),
        "other_busy": other / (seconds * (os.cpu_count() or 1)) if seconds > 0 else math.nan,
        # Of all the machine's CPUs during the window: 1.0 is saturated.
        "machine_busy": busy / total if total else math.nan,
        "machine_steal": steal / total if total else math.nan,
        "wal_bytes_per_saga": per_saga(after.wal_lsn - before.wal_lsn),
    }
