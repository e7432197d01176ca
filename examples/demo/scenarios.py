"""The demo's scenarios: each starts checkouts, breaks something on purpose, and checks
that every saga ended where it should and every effect happened exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from app.client import TERMINAL, ApiError, SagaClient, callback_due

if TYPE_CHECKING:
    from examples.demo import Orchestrator, Timing

PARTICIPANTS = ("payments", "orders", "inventory", "notifications")
LEASE_SECONDS = 3  # the demo orchestrator's lease: how soon a killed one's sagas resume
DEFINITION = "checkout"


def say(text: str = "") -> None:
    print(text, flush=True)


class Check(Exception):
    """A scenario's expectation did not hold."""


@dataclass
class Result:
    key: str
    title: str
    passed: bool = True
    summary: str = ""
    saga_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Demo:
    """What the scenarios use: the orchestrator's API, the participants, timing."""

    def __init__(
        self,
        client: SagaClient,
        http: httpx.AsyncClient,
        urls: dict[str, str],
        orchestrator: Orchestrator,
        timing: Timing,
        run: str,
    ) -> None:
        self.client = client
        self.http = http
        self.urls = urls
        self.orchestrator = orchestrator
        self.timing = timing
        self.run = run
        self.result = Result("", "")
        self.started_at = time.monotonic()

    # --- setup -----------------------------------------------------------------------

    async def register(self) -> None:
        from examples.checkout import CHECKOUT, service_specs

        specs = service_specs(self.urls, recovery_timeout_seconds=self.timing.recovery_timeout)
        for name, spec in specs.items():
            await self.client.put_service(name, spec)
            # A breaker left open by an earlier, interrupted run starts closed again.
            await self.api("POST", f"/v1/admin/services/{name}/circuit/reset")
        await self.client.register_definition(CHECKOUT)

    # --- running a scenario ----------------------------------------------------------

    async def play(
        self, key: str, title: str, scenario: Callable[[Demo], Awaitable[str]]
    ) -> Result:
        self.result = Result(key, title)
        self.started_at = time.monotonic()
        say(f"\n({key}) {title}")
        try:
            self.result.summary = await scenario(self)
        except Check as exc:
            self.result.problems.append(str(exc))
        except (ApiError, TimeoutError, httpx.HTTPError, OSError, KeyError) as exc:
            self.result.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            await self.heal()
            if not self.orchestrator.alive:  # whatever happened, keep it serving
                self.orchestrator.start()
                await self.orchestrator.wait_ready()
        self.result.passed = not self.result.problems
        for problem in self.result.problems:
            say(f"    FAILED: {problem}")
        if self.result.passed:
            say(f"    ok: {self.result.summary}")
        return self.result

    def step(self, text: str) -> None:
        say(f"    {time.monotonic() - self.started_at:5.1f}s  {text}")

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.result.problems.append(problem)

    # --- the orchestrator ------------------------------------------------------------

    async def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """An orchestrator call through the typed client, which rides out a restart's
        dropped connections (every call the demo makes is safe to repeat)."""
        try:
            return await self.client.request(method, path, **kwargs)
        except ApiError as exc:
            raise Check(f"{method} {path} answered {exc}") from None

    async def start(self, label: str, count: int) -> list[str]:
        """Start `count` checkouts at once; returns the saga ids."""

        async def one(i: int) -> str:
            started = await self.client.start_saga(
                DEFINITION, order_input(i), idempotency_key=f"demo-{self.run}-{label}-{i}"
            )
            return str(started.saga["id"])

        ids = list(await asyncio.gather(*(one(i) for i in range(count))))
        self.result.saga_ids.extend(ids)
        return ids

    async def finish(self, ids: list[str], within: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every saga is terminal."""
        return list(await asyncio.gather(*(self.client.wait(i, within=within) for i in ids)))

    async def circuit(self, service: str) -> str:
        state: str = (await self.api("GET", f"/v1/services/{service}"))["circuit_state"]
        return state

    # --- the participants ------------------------------------------------------------

    async def chaos(self, service: str, **settings: Any) -> None:
        response = await self.http.post(f"{self.urls[service]}/_chaos", json=settings)
        response.raise_for_status()

    async def heal(self) -> None:
        for service in PARTICIPANTS:
            with contextlib.suppress(httpx.HTTPError):
                await self.chaos(service)
        with contextlib.suppress(httpx.HTTPError):
            await self.provider()

    async def provider(self, **settings: Any) -> dict[str, int]:
        """Set how the payment provider confirms charges (`{}`: the default); answers
        how its callback reports have been answered so far."""
        response = await self.http.post(f"{self.urls['payments']}/_provider", json=settings)
        response.raise_for_status()
        return await self.reports()

    async def reports(self) -> dict[str, int]:
        """How the orchestrator answered the payment provider's reports, so far."""
        response = await self.http.get(f"{self.urls['payments']}/_provider")
        response.raise_for_status()
        counts: dict[str, int] = response.json()["reports"]
        return counts

    async def callback_history(self, saga_id: str) -> list[str]:
        """charge_payment's history: `accepted`, `callback_reported`, then its outcome."""
        seen: list[str] = []
        for e in await self.client.events(saga_id):
            if e.get("step") != "charge_payment" or e.get("direction") not in (None, "action"):
                continue
            if e["type"] == "attempt_finished":
                seen.append(str(e.get("outcome")))
            elif e["type"] == "callback_reported":
                seen.append("callback_reported")
        return seen

    async def effects(self, service: str, order_ref: str | None = None) -> dict[str, int]:
        params = {"order_ref": order_ref} if order_ref else {}
        response = await self.http.get(f"{self.urls[service]}/_effects", params=params)
        response.raise_for_status()
        counts: dict[str, int] = response.json()["counts"]
        return counts

    async def replays(self) -> int:
        total = 0
        for service in PARTICIPANTS:
            response = await self.http.get(f"{self.urls[service]}/_effects")
            response.raise_for_status()
            total += int(response.json()["replayed_requests"])
        return total

    async def effects_of(self, order_ref: str) -> dict[str, int]:
        """Every participant's counts for one order, in one flat dict."""
        merged: dict[str, int] = {}
        for service in PARTICIPANTS:
            merged.update(await self.effects(service, order_ref))
        return merged

    async def exactly_once(self, ids: list[str]) -> None:
        """Each completed order: charged, created, reserved and emailed exactly once."""
        for saga_id in ids:
            counts = await self.effects_of(saga_id)
            for name in ("charges", "orders", "reservations", "emails"):
                self.expect(
                    counts[name] == 1, f"order {saga_id[:8]} has {counts[name]} {name}, not 1"
                )
            for name in ("charges_refunded", "orders_cancelled", "reservations_released"):
                self.expect(counts[name] == 0, f"order {saga_id[:8]} has {counts[name]} {name}")


def order_input(i: int) -> dict[str, Any]:
    customers = ("ada", "grace", "alan", "edsger", "barbara", "ken", "margaret", "dennis")
    name = customers[i % len(customers)]
    return {
        "amount": round(19.9 + 7.5 * i, 2),
        "items": [{"sku": "coffee-beans-1kg", "qty": 1 + i % 3}],
        "email": f"{name}@example.com",
    }


def tally(statuses: list[str]) -> str:
    """ "3 completed" or "2 completed, 1 compensated"."""
    counts = Counter(statuses)
    return ", ".join(f"{n} {status}" for status, n in counts.most_common())


def step_status(saga: dict[str, Any], step: str) -> str:
    status: str = next(s["status"] for s in saga["steps"] if s["name"] == step)
    return status


def current_step(saga: dict[str, Any]) -> str:
    for s in saga["steps"]:
        if s["status"] not in ("succeeded", "fallback", "failed"):
            name: str = s["name"]
            return name
    return "-"


async def happy_path(demo: Demo) -> str:
    await demo.provider(confirm_delay_seconds=demo.timing.confirm_delay)
    taken_before = (await demo.reports()).get("taken", 0)
    began = time.monotonic()
    ids = await demo.start("happy", 3)
    demo.step("3 checkouts started")
    await waiting_for_the_provider(demo, ids)
    sagas = await demo.finish(ids)
    took = time.monotonic() - began
    statuses = [s["status"] for s in sagas]
    demo.step(f"{tally(statuses)} in {took:.1f}s")
    demo.expect(statuses == ["completed"] * 3, f"expected 3 completed, got {statuses}")
    for saga in sagas:
        bad = [s["name"] for s in saga["steps"] if s["status"] != "succeeded"]
        demo.expect(not bad, f"saga {saga['id'][:8]}: steps not succeeded: {bad}")
    await demo.exactly_once(ids)
    demo.step("each order charged once, created once, stock reserved once, receipt sent once")
    histories = [await demo.callback_history(i) for i in ids]
    expected = ["accepted", "callback_reported", "succeeded"]
    for saga_id, history in zip(ids, histories, strict=True):
        demo.expect(history == expected, f"saga {saga_id[:8]}: charge_payment went {history}")
    taken = (await demo.reports()).get("taken", 0) - taken_before
    demo.expect(taken == 3, f"the orchestrator took {taken} of the provider's 3 reports")
    demo.step("each charge: 202 accepted -> the provider's report taken (200) -> step succeeded")
    again = await demo.client.start_saga(
        DEFINITION, order_input(0), idempotency_key=f"demo-{demo.run}-happy-0"
    )
    demo.expect(
        again.replayed and again.saga["id"] == ids[0],
        "the same Idempotency-Key started a second saga",
    )
    demo.step("the first checkout sent again with its Idempotency-Key: same saga, no new charge")
    return "3 checkouts completed; each charge waited for the provider's callback, then succeeded"


async def waiting_for_the_provider(demo: Demo, ids: list[str]) -> None:
    """Show (and check) one of the charges waiting for its callback report."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for saga in await asyncio.gather(*(demo.client.get_saga(i) for i in ids)):
            due = callback_due(saga, "charge_payment")
            if due is not None:
                demo.step(
                    f"saga {saga['id'][:8]}: charge_payment is waiting for the payment "
                    f"provider's callback (payments answered 202), until {due:%H:%M:%S %Z} at most"
                )
                return
        await asyncio.sleep(0.05)
    raise Check("no charge_payment was seen waiting for its callback")


async def order_fails(demo: Demo) -> str:
    await demo.chaos("orders", fail_status=400)
    demo.step("orders now answers 400 to every request")
    (saga_id,) = await demo.start("refund", 1)
    (saga,) = await demo.finish([saga_id])
    charge = step_status(saga, "charge_payment")
    order = step_status(saga, "create_order")
    code = next(s["status_code"] for s in saga["steps"] if s["name"] == "create_order")
    demo.step(f"saga {saga['status']}: create_order {order} ({code}), charge_payment {charge}")
    demo.expect(saga["status"] == "compensated", f"saga is {saga['status']}, not compensated")
    demo.expect(order == "failed", f"create_order is {order}, not failed")
    demo.expect(charge == "compensated", f"charge_payment is {charge}, not compensated")
    payments = await demo.effects("payments", saga_id)
    orders = await demo.effects("orders", saga_id)
    demo.step(
        f"payments: {payments['charges']} charge, {payments['refunds']} refund; "
        f"orders: {orders['orders']} orders"
    )
    demo.expect(payments["charges"] == 1, f"{payments['charges']} charges, not 1")
    demo.expect(
        payments["charges_refunded"] == 1 and payments["refunds"] == 1,
        f"the charge was not refunded ({payments})",
    )
    demo.expect(orders["orders"] == 0, f"{orders['orders']} orders were created")
    return "payment succeeded, order failed -> compensated, payment refunded"


async def notifications_down(demo: Demo) -> str:
    await demo.chaos("notifications", fail_status=503)
    demo.step("notifications now answers 503 (down)")
    (saga_id,) = await demo.start("no-email", 1)
    (saga,) = await demo.finish([saga_id])
    receipt = step_status(saga, "send_receipt")
    demo.step(f"saga {saga['status']}; send_receipt {receipt} after retries")
    demo.expect(saga["status"] == "completed", f"saga is {saga['status']}, not completed")
    demo.expect(receipt == "failed", f"send_receipt is {receipt}, not failed")
    letters = await demo.api(
        "GET",
        "/v1/admin/dead-letters",
        params={"status": "open", "definition": DEFINITION, "service": "notifications"},
    )
    mine = [d for d in letters["items"] if d["saga_id"] == saga_id]
    demo.expect(
        len(mine) == 1 and mine[0]["step"] == "send_receipt",
        f"expected one open dead letter for send_receipt, found {mine}",
    )
    if mine:
        demo.step(
            f"dead letter {mine[0]['id'][:8]} holds send_receipt ({mine[0]['attempts']} attempts)"
            " for an operator to retry"
        )
    counts = await demo.effects_of(saga_id)
    demo.expect(counts["orders"] == 1 and counts["charges_refunded"] == 0, f"effects: {counts}")
    return "receipt failed -> order still completed, dead letter for send_receipt"


async def inventory_flaky(demo: Demo) -> str:
    timing = demo.timing
    await demo.chaos("inventory", fail_status=503, delay_seconds=timing.inventory_delay)
    demo.step(f"inventory now answers 503 after {timing.inventory_delay}s")
    ids = await demo.start("breaker", 4)
    deadline = time.monotonic() + 30
    while (state := await demo.circuit("inventory")) != "open":
        if time.monotonic() > deadline:
            raise Check(f"inventory's circuit never opened (it is {state})")
        await asyncio.sleep(0.1)
    demo.step(
        "inventory's circuit is open: no calls go there; sagas wait without spending attempts"
    )
    await asyncio.sleep(min(1.0, timing.recovery_timeout / 2))
    await demo.chaos("inventory")
    demo.step("inventory recovered")
    deadline = time.monotonic() + 30
    seen = {"open"}
    while (state := await demo.circuit("inventory")) != "closed":
        seen.add(state)
        if time.monotonic() > deadline:
            raise Check(f"inventory's circuit did not close again (it is {state})")
        await asyncio.sleep(0.1)
    via = " via half_open" if "half_open" in seen else ""
    demo.step(f"after {timing.recovery_timeout:g}s a probe call succeeded: circuit closed{via}")
    sagas = await demo.finish(ids)
    statuses = [s["status"] for s in sagas]
    demo.step(f"the waiting sagas went on: {tally(statuses)}")
    demo.expect(statuses == ["completed"] * 4, f"expected 4 completed, got {statuses}")
    await demo.exactly_once(ids)
    return "circuit opened, then closed; 4 sagas completed"


async def orchestrator_killed(demo: Demo) -> str:
    slow = demo.timing.slow_call
    await demo.chaos("orders", delay_seconds=slow)
    await demo.chaos("inventory", delay_seconds=slow)
    demo.step(f"orders and inventory now take {slow}s per call")
    ids = await demo.start("crash", 5)
    deadline = time.monotonic() + 20
    while True:
        sagas = await asyncio.gather(*(demo.client.get_saga(i) for i in ids))
        # Charged, and waiting for a slow call to orders or inventory.
        midway = [
            s for s in sagas if current_step(s) in ("create_order", "reserve_stock", "send_receipt")
        ]
        if len(midway) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    at = Counter(current_step(s) for s in sagas if s["status"] not in TERMINAL)
    where = ", ".join(f"{n} at {step}" for step, n in sorted(at.items()))
    replays_before = await demo.replays()
    pid = demo.orchestrator.pid
    demo.orchestrator.kill()
    demo.step(f"SIGKILL to the orchestrator (pid {pid}) with sagas in flight: {where}")
    demo.expect(len(midway) >= 2, "fewer than 2 sagas were mid-way when it was killed")
    demo.orchestrator.start()
    await demo.orchestrator.wait_ready()
    demo.step(f"orchestrator restarted (pid {demo.orchestrator.pid})")
    sagas = await demo.finish(ids)
    statuses = [s["status"] for s in sagas]
    repeated = await demo.replays() - replays_before
    demo.step(
        f"the new process took the sagas over once the dead one's {LEASE_SECONDS}s leases"
        f" expired: {tally(statuses)}"
    )
    demo.expect(statuses == ["completed"] * 5, f"expected 5 completed, got {statuses}")
    await demo.exactly_once(ids)
    if repeated:
        demo.step(
            f"{repeated} call{'s' if repeated > 1 else ''} reached a participant a second time;"
            " the Idempotency-Key dedupe answered without a second effect"
        )
    demo.step("every order: charged, created, reserved and emailed exactly once")
    return f"killed mid-run and restarted -> {len(ids)} sagas completed, effects exactly once"


async def card_declined(demo: Demo) -> str:
    await demo.provider(decline="insufficient funds")
    demo.step("the payment provider now declines every card (a `failed` callback report)")
    refused_before = await demo.reports()
    (saga_id,) = await demo.start("declined", 1)
    (saga,) = await demo.finish([saga_id])
    charge = step_status(saga, "charge_payment")
    error = saga.get("error") or {}
    demo.step(
        f"saga {saga['status']}: {error.get('kind')} at {error.get('step')}"
        f" ({error.get('message')}); charge_payment {charge}"
    )
    demo.expect(saga["status"] == "compensated", f"saga is {saga['status']}, not compensated")
    demo.expect(error.get("kind") == "callback_failed", f"the error is {error}")
    demo.expect(charge == "compensated", f"charge_payment is {charge}, not compensated")
    history = await demo.callback_history(saga_id)
    demo.expect(
        history == ["accepted", "callback_reported", "failed"],
        f"charge_payment went {history}",
    )
    demo.step("charge_payment: 202 accepted -> the failed report taken -> refund ran (a no-op)")
    taken = (await demo.reports()).get("taken", 0) - refused_before.get("taken", 0)
    demo.expect(taken == 1, f"the orchestrator took {taken} reports, not 1")
    counts = await demo.effects_of(saga_id)
    demo.step(
        f"payments: {counts['charges']} charge, {counts['charges_declined']} declined, "
        f"{counts['refunds']} refunds; orders: {counts['orders']}; "
        f"reservations: {counts['reservations']}"
    )
    demo.expect(
        (counts["charges"], counts["charges_declined"], counts["refunds"]) == (1, 1, 0),
        f"payments effects: {counts}",
    )
    for name in ("fraud_checks", "orders", "reservations", "emails"):
        demo.expect(counts[name] == 0, f"{counts[name]} {name} for a declined card")
    return "the provider declined the card in its callback -> compensated, nothing else done"


SCENARIOS: list[tuple[str, str, Callable[[Demo], Awaitable[str]]]] = [
    ("a", "Happy path: three checkouts", happy_path),
    ("b", "Payment succeeded, order creation failed -> refund the payment", order_fails),
    ("c", "Notifications down: the order still completes", notifications_down),
    ("d", "Inventory slow and failing, then recovering: its circuit breaker", inventory_flaky),
    ("e", "The orchestrator is killed (SIGKILL) mid-run and restarted", orchestrator_killed),
    ("f", "The payment provider declines the card in its callback -> compensate", card_declined),
]
