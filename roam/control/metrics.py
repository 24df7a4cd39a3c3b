"""Prometheus metrics of the fleet (GET /metrics on the control plane and on nodes).

Migration figures come from the peers' outcome events as nodes relay them (counted by
the instance that receives them); the per-node figures are read from the store at each
scrape, so every instance answers the same.
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from roam.control.evacuation import EvacuationMetrics
from roam.control.fleet import View
from roam.control.models import NodeState, VMPhase
from roam.peer.models import OutcomeEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Migrations:
    """Counters of migrations out, fed by peer outcome events (a node's own peer, or
    every node's through the control plane)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter("roam_migrations", "Migrations by outcome",
                                ["outcome"], registry=registry)
        self.downtime = Histogram("roam_migration_downtime_seconds",
                                  "Downtime of completed migrations (pause to resume)",
                                  buckets=DOWNTIME_BUCKETS, registry=registry)
        self.bytes = Counter("roam_migration_bytes", "Bytes sent by migrations",
                             registry=registry)

    def count(self, event: OutcomeEvent) -> None:
        self.outcomes.labels(event.outcome).inc()
        if event.bytes_sent is not None:
            self.bytes.inc(event.bytes_sent)
        if event.outcome == "completed" and event.downtime_ms is not None:
            self.downtime.observe(event.downtime_ms / 1000)


def serve_registry(*registries: CollectorRegistry) -> FastAPI:
    """An app answering GET /metrics from `registries` (a node's metrics listener: its
    agent's, and the process's default one with the spot watcher's)."""
    app = FastAPI(title="roam node metrics", openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(b"".join(generate_latest(r) for r in registries),
                        media_type=CONTENT_TYPE)

    return app


class FleetMetrics:
    """The control plane's metrics: migrations, and the fleet as read at the scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.migrations = Migrations(self.registry)
        self.nodes = Gauge("roam_nodes", "Nodes by state", ["state"], registry=self.registry)
        self.node_vms = Gauge("roam_node_vms", "VMs placed on each node", ["node"],
                              registry=self.registry)
        self.node_memory = Gauge("roam_node_memory_used_bytes",
                                 "Memory of the VMs placed on each node", ["node"],
                                 registry=self.registry)
        self.node_capacity = Gauge("roam_node_memory_bytes", "Memory of each node",
                                   ["node"], registry=self.registry)
        self.vms = Gauge("roam_vms", "VMs by phase", ["phase"], registry=self.registry)
        self.evacuation = EvacuationMetrics(self.registry)

    def render(self, view: View) -> bytes:
        for gauge in (self.node_vms, self.node_memory, self.node_capacity):
            gauge.clear()
        states = {s: 0 for s in NodeState}
        for name in view.nodes:
            node = view.node_view(name)
            states[node.state] += 1
            self.node_vms.labels(name).set(len(node.vms))
            self.node_memory.labels(name).set(node.memory_used_mib << 20)
            self.node_capacity.labels(name).set(node.registration.capacity.memory_bytes)
        for state, count in states.items():
            self.nodes.labels(state.value).set(count)
        phases = {p: 0 for p in VMPhase}
        for vm in view.vms.values():
            phases[vm.value.status.phase] += 1
        for phase, count in phases.items():
            self.vms.labels(phase.value).set(count)
        return generate_latest(self.registry)
