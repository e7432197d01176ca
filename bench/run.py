"""The saga benchmark: this service against DBOS Transact and a hand-rolled floor.

    .venv/bin/python bench/run.py [--quick] [--extras all|none|history,one-service,inflight]
    python3 tasks.py bench [--quick] ...

Starts a private PostgreSQL (fsync on, pg_stat_statements), a participant, and in
interleaved rounds (A B C D, A B C D, ...) each system under test on its own database:
A `saga-orchestrator serve`, B `api` + 2 `worker`s, C DBOS, D the floor. A driver
process with N callers runs sagas through each over HTTP; per system and round it
measures sagas/s at 32 callers, p50/p99 latency at 1 and at 32 callers, transaction ids,
statements, WAL, orchestrator and database CPU per saga, and peak RSS. It prints a
table and the ratios, and writes every raw figure to bench/results/<timestamp>.json.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psycopg

from bench import history
from bench.measure import Monitor, group_members, peak_rss_kib, rss_kib, window_figures
from bench.pg import BenchPostgres
from bench.procs import ChildFailed, NoAnswer, Proc, Processes, wait_until
from bench.systems import (
    BENCH,
    ONE,
    PYTHON,
    SLOW,
    THREE,
    Dbos,
    Env,
    Floor,
    Serve,
    Split,
    System,
    ensure_dbos_venv,
    http_ready,
)
from tests.support.servers import free_port

ROOT = BENCH.parent
RESULTS = BENCH / "results"
EXTRAS = ("one-service", "history", "inflight")
LOAD_TIMEOUT = 120.0  # seconds for callers to finish the saga they are in
# What makes one round or scenario fail (reported, the run goes on); anything else stops it.
FAILURES = (ChildFailed, RuntimeError, httpx.HTTPError, TimeoutError, psycopg.Error)
NOISY_PCT = 10  # others' share of the machine above which the report warns


@dataclass
class Config:
    rounds: int
    callers: int
    warmup: float
    window: float
    warmup_1: float
    window_1: float
    extras: tuple[str, ...]
    extra_rounds: int
    extra_window: float
    history_sagas: int
    inflight: int
    inflight_seconds: float
    slow_seconds: float
    systems: tuple[str, ...]
    baseline_client: str = "aiohttp"


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round, short windows, no extra scenarios (~1 min)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--callers", type=int, default=32, help="callers for throughput (32)")
    parser.add_argument("--warmup", type=float, help="seconds before the window (3; quick 2)")
    parser.add_argument("--window", type=float, help="seconds of the N-caller window (8; quick 4)")
    parser.add_argument(
        "--window-1", type=float, help="seconds of the 1-caller window (5; quick 3)"
    )
    parser.add_argument(
        "--extras",
        help="comma-separated extra scenarios: " + ",".join(EXTRAS) + "; 'all' (the default "
        "without --quick) or 'none' (the default with --quick)",
    )
    parser.add_argument(
        "--history-sagas", type=int, default=1_000_000, help="finished sagas for 'history'"
    )
    parser.add_argument(
        "--inflight", type=int, default=1000, help="sagas in flight at once for 'inflight'"
    )
    parser.add_argument(
        "--systems", default="A,B,C,D", help="which systems to run (default A,B,C,D)"
    )
    parser.add_argument(
        "--baseline-client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="the HTTP client DBOS and the floor call the participant with (aiohttp, as the "
        "service does; httpx: as they were first measured)",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    extras_arg = args.extras or ("none" if quick else "all")
    if extras_arg == "all":
        extras: tuple[str, ...] = EXTRAS
    elif extras_arg == "none":
        extras = ()
    else:
        extras = tuple(e.strip() for e in extras_arg.split(",") if e.strip())
        unknown = set(extras) - set(EXTRAS)
        if unknown:
            parser.error(f"unknown extra scenario(s): {', '.join(sorted(unknown))}")
    systems = tuple(s.strip().upper() for s in args.systems.split(",") if s.strip())
    if not systems or set(systems) - set("ABCD"):
        parser.error("--systems takes letters among A,B,C,D")
    config = Config(
        rounds=args.rounds or (1 if quick else 3),
        callers=args.callers,
        warmup=args.warmup if args.warmup is not None else (2.0 if quick else 3.0),
        window=args.window or (4.0 if quick else 8.0),
        warmup_1=1.0,
        window_1=args.window_1 or (3.0 if quick else 5.0),
        extras=extras,
        extra_rounds=1 if quick else 2,
        extra_window=4.0 if quick else 6.0,
        history_sagas=args.history_sagas,
        inflight=args.inflight,
        inflight_seconds=40.0,
        slow_seconds=5.0,
        systems=systems,
        baseline_client=args.baseline_client,
    )
    return config, quick


# --- Running one system ---------------------------------------------------------------


def measure_window(
    system: System,
    monitor: Monitor,
    callers: int,
    warmup: float,
    length: float,
    **options: Any,
) -> dict[str, Any]:
    """Start `callers`, wait `warmup`, read the counters, wait `length`, read them again."""
    load = system.load
    assert load is not None
    groups = {"system": system.pgids, "participant": [system.env.participant_pgid]}
    if load not in system.procs:
        groups["driver"] = [load.pgid]
    load.request({"cmd": "run", "callers": callers, **system.options, **options}, 60)
    warmed = warm_up(load, callers, warmup)
    before = monitor.read(groups, system.databases)
    time.sleep(length)
    after = monitor.read(groups, system.databases)
    reply = load.request({"cmd": "stop"}, LOAD_TIMEOUT + 30)
    figures = window_figures(reply["records"], before, after, int(reply["errors"]))
    figures["callers"] = callers
    figures["warmup_s"] = round(warmed, 2)
    figures["error_samples"] = reply.get("error_samples", [])
    return figures


def warm_up(load: Proc, callers: int, seconds: float) -> float:
    """At least `seconds`, and until as many sagas finished as there are callers (the
    pipeline is full), at most a minute more. Returns the seconds it took."""
    started = time.monotonic()
    time.sleep(seconds)
    while load.request({"cmd": "count"}, 30)["finished"] < callers:
        if time.monotonic() - started > seconds + 60:
            break
        time.sleep(0.2)
    return time.monotonic() - started


@contextlib.contextmanager
def running(system: System, monitor: Monitor) -> Iterator[float]:
    """The system started (after a CHECKPOINT, so no one pays another's flush), then
    stopped; yields the seconds its start took."""
    monitor.conn.execute("CHECKPOINT")
    started = time.monotonic()
    try:
        system.start()
        yield time.monotonic() - started
    finally:
        system.stop()


def measure_round(system: System, monitor: Monitor, config: Config) -> dict[str, Any]:
    with running(system, monitor) as startup:
        many = measure_window(system, monitor, config.callers, config.warmup, config.window)
        one = measure_window(system, monitor, 1, config.warmup_1, config.window_1)
        members = group_members(system.pgids)
        return {
            "startup_s": round(startup, 2),
            "processes": len(members),
            "peak_rss_mib": peak_rss_kib(members) / 1024,
            "many": many,
            "one": one,
        }


# --- Summaries --------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


FIGURES: list[tuple[str, str, Callable[[dict[str, Any]], float]]] = [
    ("sagas_per_s", "sagas/s", lambda r: r["many"]["sagas_per_s"]),
    ("p50_ms_1", "p50@1 ms", lambda r: r["one"]["p50_ms"]),
    ("p99_ms_1", "p99@1 ms", lambda r: r["one"]["p99_ms"]),
    ("p50_ms_n", "p50@N ms", lambda r: r["many"]["p50_ms"]),
    ("p99_ms_n", "p99@N ms", lambda r: r["many"]["p99_ms"]),
    ("cpu_ms_per_saga", "CPU ms", lambda r: r["many"]["cpu_ms_per_saga"]),
    ("db_cpu_ms_per_saga", "DB CPU ms", lambda r: r["many"]["db_cpu_ms_per_saga"]),
    ("xids_per_saga", "XIDs", lambda r: r["many"]["xids_per_saga"]),
    ("statements_per_saga", "stmts", lambda r: r["many"]["statements_per_saga"]),
    ("wal_kib_per_saga", "WAL KiB", lambda r: r["many"]["wal_bytes_per_saga"] / 1024),
    ("peak_rss_mib", "RSS MiB", lambda r: r["peak_rss_mib"]),
]


# Where the rest of the machine went: figures of the harness, not of the system.
HARNESS: list[tuple[str, str, Callable[[dict[str, Any]], float]]] = [
    (
        "driver_cpu_ms_per_saga",
        "driver CPU ms",
        lambda r: r["many"].get("driver_cpu_ms_per_saga", math.nan),
    ),
    (
        "participant_cpu_ms_per_saga",
        "participant CPU ms",
        lambda r: r["many"]["participant_cpu_ms_per_saga"],
    ),
    ("other_cpu_ms_per_saga", "other CPU ms", lambda r: r["many"]["other_cpu_ms_per_saga"]),
    ("other_busy_pct", "others' share %", lambda r: r["many"]["other_busy"] * 100),
    ("machine_busy_pct", "machine busy %", lambda r: r["many"]["machine_busy"] * 100),
    ("machine_steal_pct", "steal %", lambda r: r["many"]["machine_steal"] * 100),
    ("warmup_s", "warm-up s", lambda r: r["many"]["warmup_s"]),
]


def medians(rounds: Sequence[dict[str, Any]]) -> dict[str, float]:
    ok = [r for r in rounds if "error" not in r]
    out = {key: median([get(r) for r in ok]) for key, _, get in FIGURES + HARNESS}
    out["rounds_ok"] = len(ok)
    out["errors"] = sum(r["many"]["errors"] + r["one"]["errors"] for r in ok)
    out["not_completed"] = sum(
        n
        for r in ok
        for w in (r["many"], r["one"])
        for status, n in w["statuses"].items()
        if status != "completed"
    )
    return out


def paired_ratio(
    rounds: dict[str, list[dict[str, Any]]],
    a: str,
    b: str,
    get: Callable[[dict[str, Any]], float],
) -> float:
    """The median over rounds of get(a)/get(b), each pair measured back to back."""
    ratios = []
    for ra, rb in zip(rounds.get(a, []), rounds.get(b, []), strict=False):
        if "error" in ra or "error" in rb:
            continue
        num, den = get(ra), get(rb)
        if den and not math.isnan(num) and not math.isnan(den):
            ratios.append(num / den)
    return median(ratios)


def divide(meds: dict[str, dict[str, float]], a: str, b: str, figure: str) -> float:
    num = meds.get(a, {}).get(figure, math.nan)
    den = meds.get(b, {}).get(figure, math.nan)
    return num / den if den and not math.isnan(den) else math.nan


def ratios(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    rate = FIGURES[0][2]
    p50 = FIGURES[1][2]
    out: dict[str, dict[str, float]] = {}
    for key in ("A", "B", "C"):
        if key not in rounds:
            continue
        out[key] = {
            "sagas_per_s_vs_dbos": paired_ratio(rounds, key, "C", rate),
            "sagas_per_s_vs_floor": paired_ratio(rounds, key, "D", rate),
            "p50_1_vs_floor": paired_ratio(rounds, key, "D", p50),
        }
    return out


def fmt(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def times(value: float, digits: int = 2) -> str:
    text = fmt(value, digits)
    return text if text == "n/a" else text + "x"


def ratio_line(label: str, key: str, med: dict[str, float], rat: dict[str, float]) -> str:
    parts = []
    if key != "C":
        parts.append(f"{times(rat['sagas_per_s_vs_dbos'])} DBOS")
    parts.append(f"{times(rat['sagas_per_s_vs_floor'])} floor")
    parts.append(f"p50@1 {times(rat['p50_1_vs_floor'], 1)} floor's")
    parts.append(f"CPU {fmt(med['cpu_ms_per_saga'])} ms/saga")
    parts.append(f"{fmt(med['xids_per_saga'])} XIDs/saga")
    parts.append(f"{fmt(med['statements_per_saga'], 0)} statements/saga")
    return f"{label}: " + ", ".join(parts)


def table(
    labels: dict[str, str],
    meds: dict[str, dict[str, float]],
    callers: int,
    figures: Sequence[tuple[str, str, Callable[[dict[str, Any]], float]]],
    errors: bool,
) -> str:
    head = ["system", *(h.replace("@N", f"@{callers}") for _, h, _ in figures)]
    if errors:
        head.append("errors")
    rows = [head]
    digits = {"xids_per_saga": 2, "statements_per_saga": 1}
    for key, med in meds.items():
        cells = [f"{key} {labels[key]}"]
        cells += [fmt(med[name], digits.get(name, 1)) for name, _, _ in figures]
        if errors:
            cells.append(str(int(med["errors"] + med["not_completed"])))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- Extra scenarios --------------------------------------------------------------------


def one_service(env: Env, monitor: Monitor, config: Config, database: str) -> dict[str, Any]:
    """The same definition with its three steps on one service vs on three services."""
    system = Serve(env, database)
    system.setup()
    pairs: list[dict[str, Any]] = []
    with running(system, monitor):
        for _ in range(config.extra_rounds):
            three = measure_window(
                system,
                monitor,
                config.callers,
                config.warmup,
                config.extra_window,
                definition=THREE,
            )
            one = measure_window(
                system, monitor, config.callers, config.warmup, config.extra_window, definition=ONE
            )
            pairs.append({"three_services": three, "one_service": one})
            print(
                f"  one-service: three {fmt(three['sagas_per_s'])} sagas/s,"
                f" one {fmt(one['sagas_per_s'])} sagas/s",
                flush=True,
            )
    ratio = median(
        [
            p["one_service"]["sagas_per_s"] / p["three_services"]["sagas_per_s"]
            for p in pairs
            if p["three_services"]["sagas_per_s"]
        ]
    )
    return {"pairs": pairs, "one_vs_three_sagas_per_s": ratio}


def history_scenario(env: Env, monitor: Monitor, config: Config) -> dict[str, Any]:
    """Throughput of A on a database holding a million finished sagas vs an empty one."""
    empty = Serve(env, "bench_hist_empty")
    full = Serve(env, "bench_hist_full")
    empty.setup()
    full.setup()
    with running(full, monitor):  # migrate, register, and one real saga as the template
        assert full.load is not None
        reply = full.load.request({"cmd": "burst", "n": 3, "definition": THREE}, 120)
        if reply["errors"]:
            raise RuntimeError(f"template sagas failed: {reply['error_samples']}")
    print(f"  history: inserting {config.history_sagas:,} finished sagas ...", flush=True)
    loaded = history.load(full.url, config.history_sagas)
    print(
        f"  history: inserted in {loaded['insert_seconds']} s, indexes"
        f" {loaded['index_seconds']} s, vacuum+checkpoint"
        f" {loaded['vacuum_checkpoint_seconds']} s: {loaded['rows']}",
        flush=True,
    )
    sizes = monitor.conn.execute(
        "SELECT pg_database_size('bench_hist_full'), pg_database_size('bench_hist_empty')"
    ).fetchone()
    assert sizes is not None
    pairs = []
    for _ in range(config.extra_rounds):
        pair = {}
        for name, system in (("empty", empty), ("history", full)):
            with running(system, monitor):
                pair[name] = measure_window(
                    system, monitor, config.callers, config.warmup, config.extra_window
                )
        pairs.append(pair)
        print(
            f"  history: empty {fmt(pair['empty']['sagas_per_s'])} sagas/s,"
            f" with history {fmt(pair['history']['sagas_per_s'])} sagas/s",
            flush=True,
        )
    ratio = median(
        [
            p["history"]["sagas_per_s"] / p["empty"]["sagas_per_s"]
            for p in pairs
            if p["empty"]["sagas_per_s"]
        ]
    )
    return {
        "history_sagas": config.history_sagas,
        "load": loaded,
        "database_mib": {"history": sizes[0] / 2**20, "empty": sizes[1] / 2**20},
        "pairs": pairs,
        "history_vs_empty_sagas_per_s": ratio,
    }


def inflight_scenario(env: Env, monitor: Monitor, config: Config) -> dict[str, Any]:
    """Peak RSS of A with `inflight` sagas at once, their first step answering slowly."""
    n = config.inflight
    system = Serve(env, "bench_inflight", {"SAGA_WORKER_CONCURRENCY": str(min(n, 1024))})
    system.setup()
    with running(system, monitor):
        load = system.load
        assert load is not None
        time.sleep(1.0)
        members = group_members(system.pgids)
        idle_rss = rss_kib(members) / 1024
        httpx.get(env.participant + "/stats", params={"reset": 1}, timeout=10)
        started = time.monotonic()
        load.send({"cmd": "burst", "n": n, "definition": SLOW, "seconds": config.inflight_seconds})
        peak_sampled = idle_rss
        reply: dict[str, Any] | None = None
        deadline = started + config.inflight_seconds + LOAD_TIMEOUT
        while reply is None:
            peak_sampled = max(peak_sampled, rss_kib(group_members(system.pgids)) / 1024)
            with contextlib.suppress(NoAnswer):
                reply = load.receive(timeout=0.25)
            if reply is None and (time.monotonic() > deadline or not load.alive()):
                raise load.failure("the in-flight burst did not finish")
        seconds = time.monotonic() - started
        members = group_members(system.pgids)
        peak = peak_rss_kib(members) / 1024
        stats = httpx.get(env.participant + "/stats", timeout=10).json()
    statuses: dict[str, int] = {}
    for record in reply["records"]:
        statuses[record[2]] = statuses.get(record[2], 0) + 1
    return {
        "sagas": n,
        "worker_concurrency": min(n, 1024),
        "slow_step_seconds": config.slow_seconds,
        "idle_rss_mib": idle_rss,
        "peak_rss_mib": peak,
        "peak_rss_sampled_mib": peak_sampled,
        "participant_max_in_flight": stats["slow_max_in_flight"],
        "max_started_not_finished": reply.get("max_started_not_finished"),
        "answers_503": reply.get("answers_503"),
        "connection_errors": reply.get("connection_errors"),
        "unfinished_at_deadline": reply.get("unfinished"),
        "deadline_s": config.inflight_seconds,
        "statuses": statuses,
        "errors": reply["errors"],
        "error_samples": reply["error_samples"],
        "burst_seconds": round(seconds, 1),
    }


# --- Setup and the report ---------------------------------------------------------------


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _remove_stale_run_dirs() -> None:
    """Directories of runs whose harness was killed (their children died with it)."""
    for path in Path(tempfile.gettempdir()).glob("saga-bench-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if not (path / "pg" / "data" / "postmaster.pid").exists():
            shutil.rmtree(path, ignore_errors=True)


def _output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine(pg: BenchPostgres, dbos_python: Path | None) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError):
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": memory,
        "kernel": platform.release(),
        "postgresql": pg.version(),
        "postgresql_bin": str(pg.bin_dir),
        "python": platform.python_version(),
        "dbos_python": _output(
            [str(dbos_python), "-c", "import platform; print(platform.python_version())"]
        )
        if dbos_python
        else None,
        "loadavg_start": os.getloadavg(),
        "git_commit": _output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "git_dirty": bool(
            _output(["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain"])
        ),
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: n/a figures become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def start_participant(procs: Processes, slow_seconds: float) -> tuple[str, int]:
    port = free_port()
    argv: list[str | Path] = [PYTHON, BENCH / "participant.py", "--port", str(port)]
    proc = procs.spawn("participant", [*argv, "--slow-seconds", str(slow_seconds)])
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ready(url + "/healthz"), 60, proc, "ready")
    return url, proc.pgid


def run(config: Config, quick: bool, argv: Sequence[str]) -> int:
    begun = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    _remove_stale_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=f"saga-bench-{os.getpid()}-"))
    run_dir.chmod(0o711)  # the server's OS user must reach its directory inside
    (run_dir / "logs").mkdir()
    procs = Processes(run_dir / "logs")
    failures: list[str] = []
    results: dict[str, Any] = {
        "started_at": stamp,
        "command": [sys.executable, *argv],
        "mode": "quick" if quick else "full",
        "config": asdict(config),
    }
    keep_logs = False
    durations: dict[str, float] = {}
    results["durations_s"] = durations
    try:
        dbos_python: Path | None = None
        if "C" in config.systems:
            try:
                dbos_python, results["dbos_version"] = ensure_dbos_venv(
                    run_dir / "logs" / "pip.log"
                )
            except (ChildFailed, subprocess.CalledProcessError) as exc:
                failures.append(f"DBOS unavailable: {exc}")
                print(f"WARNING: DBOS unavailable, C is skipped: {exc}", flush=True)
        pg = BenchPostgres(procs, run_dir / "pg")
        pg.start()
        assert pg.proc is not None
        participant, participant_pgid = start_participant(procs, config.slow_seconds)
        token = f"bench-{os.urandom(8).hex()}"
        env = Env(
            procs,
            pg,
            run_dir,
            participant,
            participant_pgid,
            token,
            dbos_python,
            config.baseline_client,
        )
        results["machine"] = machine(pg, dbos_python)
        print(
            f"PostgreSQL {results['machine']['postgresql']} on port {pg.port} (fsync on),"
            f" participant {participant}, {results['machine']['nproc']} CPUs",
            flush=True,
        )
        every: dict[str, System] = {
            "A": Serve(env, "bench_serve"),
            "B": Split(env, "bench_split"),
            "C": Dbos(env, "bench_dbos"),
            "D": Floor(env, "bench_floor"),
        }
        systems = {k: every[k] for k in config.systems if not (k == "C" and dbos_python is None)}
        for system in systems.values():
            system.setup()
        results["systems"] = {
            k: {"label": s.label, "description": s.description, "databases": s.databases}
            for k, s in systems.items()
        }
        monitor = Monitor(pg.url(), pg.proc.pid)
        durations["setup"] = round(time.monotonic() - begun, 1)
        mark = time.monotonic()
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in systems}
        for n in range(config.rounds):
            for key, system in systems.items():
                try:
                    result = measure_round(system, monitor, config)
                except FAILURES as exc:
                    keep_logs = True
                    failures.append(f"round {n + 1} {key}: {exc}")
                    print(f"round {n + 1}/{config.rounds} {key} {system.label}: FAILED\n{exc}")
                    rounds[key].append({"error": str(exc)})
                    continue
                rounds[key].append(result)
                many, one = result["many"], result["one"]
                print(
                    f"round {n + 1}/{config.rounds} {key} {system.label:<14}"
                    f" {fmt(many['sagas_per_s']):>7} sagas/s"
                    f"  p50@1 {fmt(one['p50_ms'])} ms  p50@{config.callers}"
                    f" {fmt(many['p50_ms'])} ms  CPU {fmt(many['cpu_ms_per_saga'])} ms/saga"
                    f"  {fmt(many['xids_per_saga'], 2)} XIDs  "
                    f"{fmt(many['statements_per_saga'], 1)} stmts"
                    + (
                        f"  ERRORS {many['errors'] + one['errors']}"
                        if many["errors"] + one["errors"]
                        else ""
                    ),
                    flush=True,
                )
        results["rounds"] = rounds
        durations["rounds"] = round(time.monotonic() - mark, 1)
        meds = {k: medians(v) for k, v in rounds.items()}
        rat = ratios(rounds)
        results["medians"] = meds
        results["ratios"] = rat
        results["ratio_of_medians"] = {
            k: {
                "sagas_per_s_vs_dbos": divide(meds, k, "C", "sagas_per_s"),
                "sagas_per_s_vs_floor": divide(meds, k, "D", "sagas_per_s"),
                "p50_1_vs_floor": divide(meds, k, "D", "p50_ms_1"),
            }
            for k in meds
            if k in ("A", "B", "C")
        }
        labels = {k: s.label for k, s in systems.items()}
        lines = [ratio_line(labels[k], k, meds[k], rat[k]) for k in rat if k in meds]
        results["ratio_lines"] = lines

        extras: dict[str, Any] = {}
        for extra in config.extras:
            print(f"extra scenario: {extra}", flush=True)
            mark = time.monotonic()
            try:
                if extra == "one-service":
                    extras[extra] = one_service(env, monitor, config, "bench_serve")
                elif extra == "history":
                    extras[extra] = history_scenario(env, monitor, config)
                elif extra == "inflight":
                    extras[extra] = inflight_scenario(env, monitor, config)
            except FAILURES as exc:
                keep_logs = True
                failures.append(f"{extra}: {exc}")
                print(f"  {extra}: FAILED\n{exc}", flush=True)
                extras[extra] = {"error": str(exc)}
            durations[extra] = round(time.monotonic() - mark, 1)
        results["extras"] = extras
        extra_lines = extra_summary(extras)
        results["extra_lines"] = extra_lines
        monitor.close()
        results["machine"]["loadavg_end"] = os.getloadavg()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        left = procs.stop_all()
        if left:
            failures.append(f"{len(left)} process(es) outlived their group and were killed")
            print(f"WARNING: killed {len(left)} leftover process(es): {left}", flush=True)
        if keep_logs:
            RESULTS.mkdir(exist_ok=True)
            kept = RESULTS / f"{stamp}-logs"
            shutil.copytree(run_dir / "logs", kept, dirs_exist_ok=True)
            print(f"logs of this run: {kept}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    results["failures"] = failures
    results["duration_s"] = durations["total"] = round(time.monotonic() - begun, 1)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(_clean(results), indent=2) + "\n")

    print()
    print(
        f"medians over {config.rounds} interleaved round(s); {config.callers} callers for"
        f" sagas/s, {config.window:g} s windows after {config.warmup:g} s warm-up"
    )
    print(table(labels, meds, config.callers, FIGURES, errors=True))
    print()
    print(f"the harness, per saga at {config.callers} callers (not counted above):")
    print(table(labels, meds, config.callers, HARNESS, errors=False))
    print()
    for line in lines:
        print(line)
    for line in extra_lines:
        print(line)
    noisy = [k for k, m in meds.items() if m["other_busy_pct"] > NOISY_PCT]
    if noisy:
        print(
            f"\nNOTE: other work took more than {NOISY_PCT}% of the machine during the windows"
            f" of {', '.join(noisy)} ('others' share'): those figures are less reliable;"
            " more rounds (--rounds) help."
        )
    if failures:
        print("\nFAILURES:\n" + "\n".join(failures))
    phases = ", ".join(f"{k} {v:g} s" for k, v in durations.items() if k != "total")
    print(f"\n{durations['total']:g} s ({phases}); every figure in {out.relative_to(ROOT)}")
    return 1 if failures else 0


def extra_summary(extras: dict[str, Any]) -> list[str]:
    lines = []
    one = extras.get("one-service", {})
    if "one_vs_three_sagas_per_s" in one:
        lines.append(
            f"one service vs three (serve): {times(one['one_vs_three_sagas_per_s'])} sagas/s"
        )
    hist = extras.get("history", {})
    if "history_vs_empty_sagas_per_s" in hist:
        lines.append(
            f"with {hist['history_sagas']:,} finished sagas (serve): "
            f"{times(hist['history_vs_empty_sagas_per_s'])} the empty-table sagas/s"
        )
    inflight = extras.get("inflight", {})
    if "peak_rss_mib" in inflight:
        peak, idle = fmt(inflight["peak_rss_mib"], 0), fmt(inflight["idle_rss_mib"], 0)
        done = sum(inflight["statuses"].values())
        lines.append(
            f"{inflight['sagas']} sagas started at once (serve): peak RSS {peak} MiB"
            f" (idle {idle} MiB); {inflight['max_started_not_finished']} in flight at most,"
            f" {inflight['participant_max_in_flight']} calls to the participant at once at most,"
            f" {inflight['answers_503']} answers 503 and {inflight['connection_errors']}"
            f" connection errors (retried); {done} finished within {inflight['deadline_s']:g} s"
        )
    return lines


def main() -> None:
    config, quick = parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        code = run(config, quick, sys.argv)
    except KeyboardInterrupt:
        print("\ninterrupted: every process of this run was stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
