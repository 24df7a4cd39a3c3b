"""Migration out: one VM from this peer to another, as one sequence of steps.

The engine (roam.migration.source) drives the migration and calls back at each step;
`Outgoing` holds what those steps share (the handover's clock marks, whether frames were
redirected) and turns the engine's outcome into the VM's next state:

1. pre-copy while the guest runs (state migrating); before every dirty collection the
   machine's memory is flushed into the memory device (`before_collect`);
2. once the handover is decided, the guest's before_suspend hook (`before_suspend`),
   one last short cycle while it runs;
3. `suspend`: redirect the VM's frames to the destination (overlay), flush memory again,
   pause (state paused), save the device state below the tracker;
4. `authority`: the payload (roam.vm.group.Authority and the device state, sent once);
5. on abort or decline, `resume` undoes 3 (state running); an unacknowledged authority
   leaves the VM paused (in-doubt); an acknowledged one ends it here (migrated, or
   handed-over if post-copy failed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import blake3

from roam.errors import ErrorCode
from roam.migration.channel import Address, connect
from roam.migration.errors import Declined, InDoubt, PostcopyFailed
from roam.migration.source import Policy, Source, SourceHooks, SourceResult
from roam.migration.wire import Encoding
from roam.network import overlay
from roam.peer import events, syncing
from roam.peer.errors import PeerError
from roam.peer.models import Done, Prepared
from roam.peer.packages import package_id
from roam.storage.provider import Provider
from roam.vm import group
from roam.vm.group import Authority, Device
from roam.vm.states import VMState

if TYPE_CHECKING:
    from roam.peer.instance import Instance

log = logging.getLogger(__name__)

DIGEST_CHUNK = 4 << 20
COMPRESSIONS = {"none": Encoding.RAW, "zstd": Encoding.ZSTD, "lz4": Encoding.LZ4}


@dataclass
class Migrated:
    """What the source learns from one migration out."""

    outcome: str
    bytes_sent: int
    total_ms: float
    cycles: int
    dirty_per_cycle: list[int]
    final_dirty: int
    handover_ms: float  # pause to authority sent
    state_save_ms: float  # pause to the device state saved and memory flushed
    downtime_ms: float  # pause to the destination's acknowledgement (an upper bound)
    priority_blocks: int
    first_response_ms: float | None  # pause to the guest's first answer there (its DONE)
    first_pass_ms: float  # the destination ready to every block sent once
    first_pass_payload_bytes: int  # data (not zero, not held) sent by the first pass
    have_bytes: int  # named, not sent: the destination held them (a package's files)
    store_offered_bytes: int  # left to the destination to take from the object store


@dataclass
class Marks:
    """perf_counter() at the handover's steps, and the wall clock of the pause (which the
    destination compares with its own to report the downtime)."""

    stop_wall: float = 0.0
    stop: float = 0.0
    saved: float = 0.0
    authority: float = 0.0


def policy_from(params: dict[str, Any]) -> Policy:
    defaults = Policy()
    return Policy(
        max_dirty_blocks=int(params.get("max_dirty_blocks", defaults.max_dirty_blocks)),
        min_cycles=int(params.get("min_cycles", defaults.min_cycles)),
        max_cycles=int(params.get("max_cycles", defaults.max_cycles)),
        cycle_throttle=float(params.get("cycle_throttle", defaults.cycle_throttle)),
        postcopy=bool(params.get("postcopy", defaults.postcopy)),
        pause_send_bytes=int(params.get("pause_send_kib", defaults.pause_send_bytes >> 10))
        << 10,
        compression=COMPRESSIONS[str(params.get("compression", "none"))],
        verify=bool(params.get("verify", defaults.verify)),
    )


class Outgoing:
    """One migration of `instance` to another peer. With `check_memory` the destination
    compares its memory device with ours at the pause before it resumes (and declines if
    they differ); that costs a full read of memory on both sides inside the downtime."""

    def __init__(self, instance: Instance, policy: Policy, check_memory: bool = False) -> None:
        self.instance = instance
        self.policy = replace(policy, await_prepared=True)
        self.check_memory = check_memory
        self.marks: Marks | None = None
        self.redirected = False
        self.source: Source | None = None

    async def run(self, to: str) -> Migrated:
        instance = self.instance
        if instance.incoming is not None:
            await instance.incoming  # post-copy of the previous hop must be over
        instance.migrating = True
        try:
            channel = await connect(Address.parse(to), instance.tls)
            try:
                self.source = Source(channel, [instance.devices[n] for n in instance.order],
                                     self._hooks(), self.policy, group_name=instance.spec.name,
                                     package=package_id(instance.spec.config))
                instance.set_state(VMState.MIGRATING)
                result = await self._settle(self.source)
            finally:
                await channel.close()
        finally:
            instance.migrating = False
        return self._report(result)

    def _hooks(self) -> SourceHooks:
        job = self.instance.sync
        return SourceHooks(before_collect=self.instance.vm.machine.flush_memory,
                           before_suspend=self.instance.vm.before_suspend,
                           suspend=self.suspend, authority=self.authority,
                           resume=self.resume, progress=events.progress(self.instance),
                           store_offer=None if job is None or job.task is None
                           or job.task.done() else lambda: syncing.store_offer(job.syncer))

    async def _settle(self, source: Source) -> SourceResult:
        """Run the engine; the VM's state follows from how it ended."""
        instance = self.instance
        try:
            result = await source.run()
        except InDoubt:
            instance.set_state(VMState.IN_DOUBT)  # paused here; an operator decides
            raise
        except PostcopyFailed:
            instance.set_state(VMState.HANDED_OVER)  # the destination owns it
            raise
        except BaseException:
            if instance.state == VMState.MIGRATING:  # never paused: nothing to undo
                instance.set_state(VMState.RUNNING)
            raise
        if result.outcome == "completed":
            instance.set_state(VMState.MIGRATED)
            instance.finished.set()
        elif not Prepared.model_validate_json(result.prepared or b"{}").backup:
            raise Declined(f"the destination declined the VM ({result.decline_reason}); "
                           "it runs on here")
        return result

    async def suspend(self) -> None:
        instance = self.instance
        machine = instance.vm.machine
        if instance.spec.overlay is not None:
            await self._redirect()
        # Write back what the guest dirtied during the last cycle while it still runs,
        # right before the pause: the flush inside it then carries only what the guest
        # dirtied in the few milliseconds between.
        await machine.flush_memory()
        marks = self.marks = Marks(stop=time.perf_counter())
        marks.stop_wall = await machine.pause()
        instance.set_state(VMState.PAUSED)
        # The memory flush overlaps the state save; the engine's flush after this hook
        # then finds (almost) nothing left. The state goes below the tracker: it travels
        # once, in the authority payload.
        await asyncio.gather(machine.save_state(instance.below_tracker(Device.STATE)),
                             machine.flush_memory())
        marks.saved = time.perf_counter()

    async def _redirect(self) -> None:
        """Frames still reaching this host go on to the destination's tap, which its
        paused machine holds open: they wait there instead of being lost."""
        instance = self.instance
        assert instance.net is not None and self.source is not None
        prepared = Prepared.model_validate_json(self.source.result.prepared or b"{}")
        if not prepared.underlay:
            raise PeerError("the destination peer is not on the VM's overlay (no --underlay)",
                            code=ErrorCode.BAD_REQUEST)
        self.redirected = True
        await overlay.redirect(instance.net, instance.spec.config.mac, prepared.underlay)

    async def authority(self) -> bytes:
        instance = self.instance
        assert self.marks is not None
        digest = None
        if self.check_memory:  # below the tracker: reading for the payload is not migrating
            digest = await memory_digest(instance.below_tracker(Device.MEMORY))
        payload = await group.write_authority(
            Authority(live=True, stop_wall=self.marks.stop_wall, memory_blake3=digest),
            instance.below_tracker(Device.STATE))
        if instance.sync is not None:  # the destination syncs the VM from now on
            await instance.sync.hold()
        self.marks.authority = time.perf_counter()
        return payload

    async def resume(self) -> None:
        """Undo `suspend`: the handover was aborted or declined; the VM runs on here."""
        instance = self.instance
        if self.redirected:
            assert instance.net is not None
            await overlay.restore(instance.net, instance.spec.config.mac)
            self.redirected = False
        if instance.state == VMState.PAUSED:
            await instance.vm.resume_paused()
            instance.set_state(VMState.RUNNING)
        if instance.sync is not None:
            instance.sync.launch()

    def _report(self, result: SourceResult) -> Migrated:
        marks = self.marks
        return Migrated(
            outcome=result.outcome, bytes_sent=result.bytes_sent,
            total_ms=result.total_seconds * 1000, cycles=result.cycles,
            dirty_per_cycle=result.dirty_per_cycle, final_dirty=result.final_dirty,
            handover_ms=(marks.authority - marks.stop) * 1000 if marks else 0.0,
            state_save_ms=(marks.saved - marks.stop) * 1000 if marks else 0.0,
            downtime_ms=_ack_downtime(marks, result.suspended_seconds,
                                      result.handover_seconds),
            priority_blocks=result.priority_blocks,
            first_response_ms=Done.parse(result.done).first_response_ms,
            first_pass_ms=result.first_pass_seconds * 1000,
            first_pass_payload_bytes=result.first_pass_payload_bytes,
            have_bytes=result.have_bytes,
            store_offered_bytes=result.store_offered_bytes)


async def memory_digest(device: Provider) -> str:
    """blake3 of a whole device, for comparing two copies."""
    hasher = blake3.blake3()
    size = device.size()
    for offset in range(0, size, DIGEST_CHUNK):
        hasher.update(await device.read_at(offset, min(DIGEST_CHUNK, size - offset)))
    return hasher.hexdigest()


def _ack_downtime(marks: Marks | None, suspended: float, handover: float) -> float:
    """Pause to the acknowledgement, from the source's clock: the suspend hook started
    `handover` seconds before authority was sent and `suspended` before the answer."""
    if marks is None:
        return 0.0
    hook_started = marks.authority - handover
    return (hook_started + suspended - marks.stop) * 1000
