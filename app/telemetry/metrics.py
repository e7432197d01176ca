"""Prometheus metrics: counters kept by each process, gauges read from the database at
scrape time (so every process reports the same shared figures)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True, slots=True)
class SharedFigures:
    """What the database says at scrape time."""

    sagas_by_status: dict[tuple[str, str], int]  # (definition, status) -> count, in flight
    circuits: dict[str, str]  # service -> state
    in_flight: dict[str, int]  # service -> calls in flight (live leases)
    dead_letters_open: int
    executor_lag_seconds: float


class Metrics:
    """One registry per app instance, so that tests can run several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sagas_started = Counter(
            "saga_started", "Sagas started, by definition.", ["definition"], registry=r
        )
        self.sagas_finished = Counter(
            "saga_finished",
            "Sagas that reached a terminal status.",
            ["definition", "status"],
            registry=r,
        )
        self.attempts = Counter(
            "saga_step_attempts",
            "Participant call attempts.",
            ["service", "direction", "outcome"],
            registry=r,
        )
        self.notification_attempts = Counter(
            "saga_notification_attempts",
            "Completion notification delivery attempts, by outcome.",
            ["service", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "saga_step_latency_seconds",
            "Participant call latency.",
            ["service", "direction"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pruned_rows = Counter(
            "saga_pruned_rows",
            "Rows deleted by retention (SAGA_RETENTION_HOURS), by table.",
            ["table"],
            registry=r,
        )
        self.local_in_flight = Gauge(
            "saga_executor_calls_in_flight", "Calls this process has in flight.", registry=r
        )
        self.sagas = Gauge(
            "saga_sagas",
            "Sagas in flight (running, compensating) by definition and status; finished "
            "sagas are counted by saga_finished_total.",
            ["definition", "status"],
            registry=r,
        )
        self.circuit = Gauge(
            "saga_circuit_state",
            "Circuit state per service: 0 closed, 1 half-open, 2 open.",
            ["service"],
            registry=r,
        )
        self.service_in_flight = Gauge(
            "saga_service_calls_in_flight",
            "Calls in flight per service, all processes.",
            ["service"],
            registry=r,
        )
        self.dead_letters_open = Gauge(
            "saga_dead_letters_open", "Dead letters waiting for an operator.", registry=r
        )
        self.executor_lag = Gauge(
            "saga_executor_lag_seconds",
            "Now minus the due time of the oldest due saga.",
            registry=r,
        )

    def render(self, shared: SharedFigures) -> bytes:
        self.sagas.clear()
        for (definition, status), count in shared.sagas_by_status.items():
            self.sagas.labels(definition, status).set(count)
        self.circuit.clear()
        for service, state in shared.circuits.items():
            self.circuit.labels(service).set(CIRCUIT_VALUES.get(state, 0))
        self.service_in_flight.clear()
        for service, count in shared.in_flight.items():
            self.service_in_flight.labels(service).set(count)
        self.dead_letters_open.set(shared.dead_letters_open)
        self.executor_lag.set(shared.executor_lag_seconds)
        return generate_latest(self.registry)
