"""/metrics: dramatiq's worker metrics (multiprocess files) plus what dramatiq does not export."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from core.settings import Settings


class StoreCollector:
    """Queue depth and outbox backlog, read at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from web.app import overview

        data = overview(self.settings)
        depth = GaugeMetricFamily(
            "tidemill_queue_messages", "Messages per queue and state", labels=["queue", "state"]
        )
        for q in data["queues"]:
            for state in ("ready", "delayed", "dead"):
                depth.add_metric([q["name"], state], q[state])
        yield depth
        yield GaugeMetricFamily(
            "tidemill_outbox_backlog",
            "Outbox rows not yet dispatched",
            value=data["outbox_backlog"],
        )
        yield GaugeMetricFamily(
            "tidemill_outbox_oldest_seconds",
            "Age of the oldest undispatched outbox row",
            value=data["outbox_oldest_s"] or 0.0,
        )


def render(settings: Settings) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    prom_dir = settings.data_dir / "prometheus"
    if prom_dir.is_dir() and any(prom_dir.glob("*.db")):
        MultiProcessCollector(registry, path=str(prom_dir))
    registry.register(StoreCollector(settings))
    return generate_latest(registry), CONTENT_TYPE_LATEST
