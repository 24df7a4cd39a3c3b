"""The node's side of lost nodes: pause this node's VMs when its lease may be gone.

A node agent that has gone a lease TTL without a successful heartbeat cannot tell a
control plane that is down from one that counts the node lost, and after 2 TTL more
may start its VMs elsewhere (roam.control.lost). So it pauses every VM that runs here
(the peer's POST /vms/{name}/pause: the guest stops, its memory and connections stay)
and keeps them paused until a heartbeat succeeds again; then it asks the control plane
about each: one still placed on this node, or arriving here (a migration whose handover
completed while the control plane could not be reached: the authority is here, the
control plane settles it once it sees it run), wanted running, is resumed; any other is
stopped, since it may run elsewhere now. A VM in the middle of a migration is left to
it: the migration's own authority transfer decides where it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from roam.control.client import ControlClient
from roam.errors import ErrorCode, RoamError
from roam.peer.client import PeerClient

log = logging.getLogger("roam.node")


class Fence:
    """Pauses the peer's VMs after `ttl` without a heartbeat (`alive` says when one
    succeeds); `restore` after one does."""

    def __init__(self, peer: PeerClient, control: ControlClient, node: str) -> None:
        self.peer = peer
        self.control = control
        self.node = node
        self.ttl: float | None = None  # known once registered
        self.last_ok = time.monotonic()
        self.paused: set[str] = set()

    def alive(self, ttl: float) -> None:
        self.ttl = ttl
        self.last_ok = time.monotonic()

    async def watch(self) -> None:
        """Until cancelled: pause every running VM once a TTL passed without `alive`."""
        while True:
            await asyncio.sleep(0.1 if self.ttl is None else self.ttl / 10)
            if self.ttl is None or time.monotonic() - self.last_ok < self.ttl:
                continue
            try:
                running = [vm.name for vm in await self.peer.vms()
                           if vm.state == "running" and vm.name not in self.paused]
            except RoamError as exc:
                log.warning("fencing: cannot list the peer's VMs: %s", exc.message)
                continue
            for name in running:
                try:
                    await self.peer.pause(name)
                except RoamError as exc:  # e.g. it began migrating meanwhile
                    log.warning("fencing: cannot pause %s: %s", name, exc.message)
                    continue
                self.paused.add(name)
                log.warning("paused %s: no heartbeat for %.1f s (lease TTL %.1f s), so the "
                            "control plane may start it elsewhere", name,
                            time.monotonic() - self.last_ok, self.ttl)

    async def restore(self) -> None:
        """After a heartbeat succeeded: resume what still runs here, stop the rest."""
        for name in sorted(self.paused):
            try:
                vm = await self.control.vm(name)
            except RoamError as exc:
                if exc.code != ErrorCode.NOT_FOUND:
                    log.warning("fenced %s: cannot ask the control plane: %s", name,
                                exc.message)
                    return  # ask again after the next heartbeat
                vm = None
            ours = vm is not None and vm.desired.running and not vm.desired.deleted \
                and self.node in (vm.status.node, vm.status.target)
            with contextlib.suppress(RoamError):
                if ours:
                    await self.peer.resume(name)
                    log.info("resumed %s: the control plane still places it here", name)
                else:
                    await self.peer.stop(name)
                    log.warning("stopped %s: the control plane no longer places it here",
                                name)
            self.paused.discard(name)
