"""A VM's lifecycle on one host, as an enum with the transitions it may take.

    starting --> running            (resumed from a package)
    incoming --> running            (authority taken from a source or a registry)
    running  --> migrating          (pre-copy to a destination; the guest still runs)
    migrating --> running           (the migration failed before the pause)
    migrating --> paused            (paused for the handover)
    running  --> paused             (fenced: its node lost its control plane; resumed
                                     when the control plane says it still runs here)
    paused   --> running            (aborted before authority, or declined: resumed here)
    paused   --> in-doubt           (authority sent, never acknowledged: stays paused)
    paused   --> handed-over        (acknowledged, then post-copy failed: the
                                     destination owns it; never resumed here)
    paused   --> migrated           (acknowledged, every block delivered)
    in-doubt --> running            (an operator settled it for this host)
    any live state --> stopped      (stopped, or its hypervisor died)

`migrated` and `stopped` are final: the VM no longer runs on this host.
"""

from __future__ import annotations

import enum

from roam.errors import ErrorCode, RoamError

__all__ = ["LIVE", "InvalidTransition", "VMState", "check_transition"]


class VMState(enum.StrEnum):
    STARTING = "starting"
    INCOMING = "incoming"
    RUNNING = "running"
    MIGRATING = "migrating"
    PAUSED = "paused"
    IN_DOUBT = "in-doubt"
    HANDED_OVER = "handed-over"
    MIGRATED = "migrated"
    STOPPED = "stopped"
    MIRROR = "mirror"  # a standby copy of a VM that runs elsewhere (roam.peer.mirrored)


_FINAL = frozenset({VMState.MIGRATED, VMState.STOPPED})
LIVE = frozenset(VMState) - _FINAL - {VMState.MIRROR}
"""States in which this host holds the VM (running or not)."""

TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.STARTING: frozenset({VMState.RUNNING}),
    VMState.INCOMING: frozenset({VMState.RUNNING}),
    VMState.RUNNING: frozenset({VMState.MIGRATING, VMState.PAUSED}),
    VMState.MIGRATING: frozenset({VMState.RUNNING, VMState.PAUSED}),
    VMState.PAUSED: frozenset({VMState.RUNNING, VMState.IN_DOUBT, VMState.HANDED_OVER,
                               VMState.MIGRATED}),
    VMState.IN_DOUBT: frozenset({VMState.RUNNING}),
    VMState.HANDED_OVER: frozenset(),
    VMState.MIGRATED: frozenset(),
    VMState.STOPPED: frozenset(),
    VMState.MIRROR: frozenset(),
}


class InvalidTransition(RoamError):
    """A change of state the lifecycle does not allow (a bug, or a request that came in
    the wrong state)."""

    code = ErrorCode.CONFLICT


def check_transition(old: VMState, new: VMState) -> None:
    if new == VMState.STOPPED and old in LIVE:
        return
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"a VM that is {old} cannot become {new}")
