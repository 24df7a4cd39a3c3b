"""Prometheus metrics of the spot watcher, in the process's default registry (the node's
/metrics exposes them)."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["METADATA_PROBLEMS", "NOTICES"]

NOTICES = Counter("roam_spot_notices", "Spot notices seen, each counted once", ["cloud"])
METADATA_PROBLEMS = Counter(
    "roam_spot_metadata_problems",
    "Metadata requests that gave no usable answer: unavailable (network, 5xx, 429, "
    "retried with backoff) or bad (refused answers, never acted on)",
    ["cloud", "kind"])
