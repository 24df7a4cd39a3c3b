"""The pause of a consistent point: a running VM stopped the way a handover stops it, so
that memory, disk and device state are of one instant while the VM stands still.

Used by a mirror's checkpoint (roam.peer.mirroring), a sync's sealed point and a
hibernation (roam.peer.sealing). Memory is flushed while the VM still runs (the flush in
the pause then carries only the last moments), QMP stop, the device state saved into the
state device *through* its dirty tracker (every reader, mirror or sync, sees it as
changed) beside a second memory flush. Then the caller reads or seals what it needs; on
leaving, the VM resumes (unless the caller keeps it stopped: hibernation) and the pause
is recorded in the VM's info (`last_pause_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from roam.errors import ErrorCode
from roam.peer.errors import PeerError
from roam.vm.group import Device
from roam.vm.states import VMState

if TYPE_CHECKING:
    from roam.peer.instance import Instance


@dataclass
class Pause:
    at: float  # wall clock of QMP stop
    started: float  # perf_counter of QMP stop
    ms: float = 0.0  # stop to cont, once resumed
    resume: bool = True  # the caller may clear it: the VM then stays stopped


@contextlib.asynccontextmanager
async def paused(instance: Instance) -> AsyncIterator[Pause]:
    """Pause `instance` for a consistent point; PeerError (busy) while a migration or
    another pause holds it, or when it does not run."""
    if instance.migrating or instance.state != VMState.RUNNING:
        raise PeerError(f"{instance.spec.name} is {instance.state}"
                        f"{' and migrating' if instance.migrating else ''}: no pause now",
                        code=ErrorCode.BUSY)
    machine = instance.vm.machine
    instance.migrating = True  # a migration asked for meanwhile is refused as busy
    try:
        await machine.flush_memory()
        pause = Pause(at=time.time(), started=time.perf_counter())
        await machine.pause()
        try:
            await asyncio.gather(machine.save_state(instance.tracker(Device.STATE)),
                                 machine.flush_memory())
            yield pause
        finally:
            if pause.resume:
                await machine.resume()
            pause.ms = round((time.perf_counter() - pause.started) * 1000, 3)
            instance.info["last_pause_ms"] = pause.ms
    finally:
        instance.migrating = False
