"""Prometheus wiring shared by every metrics module of the service: the multiprocess folder, the merged /metrics
text, and the arguments every metric is made with.

The metrics are not registered in prometheus-client's default registry (``registry=None``): in multiprocess mode
their values live in the files that `collect_metrics` reads, and unregistered metrics can be made again (tests).
"""

from __future__ import annotations

import os
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNREGISTERED = {"registry": None}  # see the module's docstring
GAUGE = {"multiprocess_mode": "mostrecent", **UNREGISTERED}  # gauges with one writer (the logger process)


# ------------------------------------------------------------------------------------------------ Prometheus wiring
def enable_multiprocess_metrics(folder: str | Path) -> Path:
    """Point prometheus-client at ``folder`` (emptied) for this process and every process it starts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # files of an earlier run would be merged into this one's metrics
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)
    # prometheus-client picks its value class when first imported; switch it in case it was imported already.
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()
    return folder


def collect_metrics() -> tuple[bytes, str]:
    """The merged metrics of every process of the service, in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def exponential_buckets(start: float, factor: float, stop: float) -> list[float]:
    """Histogram buckets start, start*factor, ... up to and including the first one >= stop."""
    buckets = [start]
    while buckets[-1] < stop:
        buckets.append(buckets[-1] * factor)
    return buckets
