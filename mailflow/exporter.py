"""Optional Prometheus endpoint (`[metrics] port`): what an operator watches.

Two kinds of figures:

* this process's counters — mail processed by outcome, processing time, relay attempts —
  recorded by the pipeline and the relay (no-ops when prometheus-client is not installed);
* the desk's state, read from the database at each scrape, so every daemon of a scaled-out
  desk reports the same numbers — inbound mail by state, outbox by state and its depth, the
  oldest pending mail, the last successful poll and last error per mailbox, the mailbox lease
  holder, and SLA breaches.

Install with `pip install mailflow[metrics]`; scrape `http://ADDRESS:PORT/metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from mailflow.errors import ConfigError
from mailflow.models import Inbound, MailboxState, Outbox, Ticket, utcnow

if TYPE_CHECKING:
    from mailflow.desk import Desk

log = logging.getLogger(__name__)

try:  # an optional dependency: without it recording is a no-op and no endpoint starts
    import prometheus_client as prom
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - exercised only without the extra installed
    prom = None  # type: ignore[assignment]
    Collector = object  # type: ignore[assignment,misc]

INBOUND_STATES = ("processed", "ignored", "quarantined", "pending")
OUTBOX_STATES = ("queued", "sent", "dead")
REGISTRY: Any = prom.CollectorRegistry(auto_describe=True) if prom else None

if prom is not None:
    MESSAGES = prom.Counter(
        "mailflow_messages",
        "Inbound mail handled by this process, by outcome",
        ["outcome"],
        registry=REGISTRY,
    )
    PROCESSING = prom.Histogram(
        "mailflow_processing_seconds",
        "Time to process one inbound mail (parse, classify, ticket, notifications)",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        registry=REGISTRY,
    )
    RELAY = prom.Counter(
        "mailflow_relay_attempts",
        "Outgoing mail delivery attempts by this process, by result",
        ["result"],
        registry=REGISTRY,
    )


def observe(outcome: str, seconds: float) -> None:
    """Record one processed inbound mail."""
    if prom is not None:
        MESSAGES.labels(outcome).inc()
        PROCESSING.observe(seconds)


def relayed(result: str, count: int = 1) -> None:
    """Record delivery attempts: sent | retry | dead."""
    if prom is not None and count:
        RELAY.labels(result).inc(count)


class DeskCollector(Collector):  # type: ignore[misc]
    """The desk's state from the database, read at each scrape."""

    def __init__(self, desk: Desk) -> None:
        self.desk = desk

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("mailflow_database_up", "1 when the database answered the scrape")
        try:
            families = list(self._families())
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Any]:
        now = utcnow()
        with self.desk.db.sessions() as session:
            inbound = dict(
                session.execute(select(Inbound.state, func.count()).group_by(Inbound.state)).all()
            )
            outbox = dict(
                session.execute(select(Outbox.state, func.count()).group_by(Outbox.state)).all()
            )
            oldest = session.scalar(
                select(func.min(Inbound.received_at)).where(Inbound.state == "pending")
            )
            mailboxes = session.execute(
                select(
                    MailboxState.name,
                    MailboxState.last_poll_at,
                    MailboxState.last_error,
                    MailboxState.lease_owner,
                    MailboxState.lease_until,
                )
            ).all()
            breaches = _breaches(session)
        yield _by_state("mailflow_inbound", "Inbound mail by state", INBOUND_STATES, inbound)
        yield _by_state("mailflow_outbox", "Outgoing mail by state", OUTBOX_STATES, outbox)
        depth = GaugeMetricFamily("mailflow_outbox_depth", "Outgoing mail waiting to be sent")
        depth.add_metric([], outbox.get("queued", 0))
        yield depth
        age = GaugeMetricFamily(
            "mailflow_oldest_pending_seconds", "Age of the oldest mail waiting to be processed"
        )
        age.add_metric([], max((now - oldest).total_seconds(), 0.0) if oldest else 0.0)
        yield age
        yield from _mailbox_families(mailboxes, now)
        yield from breaches


def _by_state(name: str, doc: str, states: tuple[str, ...], counts: dict[str, int]) -> Any:
    family = GaugeMetricFamily(name, doc, labels=["state"])
    for state in states:
        family.add_metric([state], counts.get(state, 0))
    return family


def _mailbox_families(rows: list[Any], now: Any) -> Iterator[Any]:
    last = GaugeMetricFamily(
        "mailflow_last_poll_timestamp_seconds",
        "When each mailbox was last polled successfully (Unix time)",
        labels=["mailbox"],
    )
    error = GaugeMetricFamily(
        "mailflow_mailbox_error", "1 when the mailbox's last poll failed", labels=["mailbox"]
    )
    lease = GaugeMetricFamily(
        "mailflow_mailbox_lease", "The daemon holding the mailbox's poller lease",
        labels=["mailbox", "owner"],
    )
    for row in rows:
        if row.last_poll_at is not None:
            last.add_metric([row.name], row.last_poll_at.timestamp())
        error.add_metric([row.name], 1 if row.last_error else 0)
        if row.lease_owner and row.lease_until is not None and row.lease_until >= now:
            lease.add_metric([row.name, row.lease_owner], 1)
    yield last
    yield error
    yield lease


def _breaches(session: Any) -> list[Any]:
    resolve = session.scalar(
        select(func.count()).select_from(Ticket).where(Ticket.sla_breached_at.is_not(None))
    )
    response = session.scalar(
        select(func.count()).select_from(Ticket).where(Ticket.response_breached_at.is_not(None))
    )
    open_breached = session.scalar(
        select(func.count())
        .select_from(Ticket)
        .where(
            Ticket.sla_breached_at.is_not(None),
            Ticket.status.not_in(("resolved", "closed", "problem")),
        )
    )
    total = GaugeMetricFamily(
        "mailflow_sla_breaches", "Tickets whose SLA target was missed, by target",
        labels=["target"],
    )
    total.add_metric(["resolve"], resolve or 0)
    total.add_metric(["response"], response or 0)
    still = GaugeMetricFamily(
        "mailflow_sla_breached_open", "Open tickets past their resolution target"
    )
    still.add_metric([], open_breached or 0)
    return [total, still]


class Endpoint:
    """The HTTP endpoint serving /metrics for one desk; `stop()` shuts it down."""

    def __init__(self, desk: Desk, address: str, port: int) -> None:
        if prom is None:  # `mailflow run` checks this first (mailflow/extras.py)
            raise ConfigError(
                "[metrics] port is set but prometheus-client is not installed: "
                "pip install 'mailflow[metrics]'"
            )
        self.collector = DeskCollector(desk)
        REGISTRY.register(self.collector)
        try:
            self.server, self.thread = prom.start_http_server(port, address, registry=REGISTRY)
        except OSError:
            REGISTRY.unregister(self.collector)
            raise
        self.port = self.server.server_port
        log.info("metrics on http://%s:%s/metrics", address, self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        REGISTRY.unregister(self.collector)


def serve(desk: Desk) -> Endpoint | None:
    """Start the endpoint when `[metrics] port` is set; None otherwise."""
    cfg = desk.settings.metrics
    if not cfg.port:
        return None
    return Endpoint(desk, cfg.address, cfg.port)
