"""How `roam ls` and `roam peer ls` show VMs: one table, the same columns, the same JSON.

Both list VM info objects (a `roam run`'s control socket reply, or the peer API's
VMInfo). The JSON is those objects as they are, plus `uptime_s` (seconds since the VM
began running on this host, from `resumed_at`); the table adds units. The dirty rate is
known while a migration out measures it (and stays at its last value).
"""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

__all__ = ["duration", "rate", "table", "with_uptime"]

Info = dict[str, Any]


def with_uptime(vms: list[Info], now: float | None = None) -> list[Info]:
    """`vms` with `uptime_s` (None if not known)."""
    now = time.time() if now is None else now
    return [{**vm, "uptime_s": None if vm.get("resumed_at") is None
             else round(max(0.0, now - vm["resumed_at"]), 1)} for vm in vms]


def duration(seconds: float | None) -> str:
    """45s, 12m03s, 3h04m, 2d03h: two units at most."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def rate(bytes_per_second: float | None) -> str:
    return "-" if bytes_per_second is None else f"{bytes_per_second / 2**20:.1f} MiB/s"


def sync_lag(sync: Info | None) -> str:
    """A VM's sync as `peer ls` shows it: what is not uploaded yet and for how long, and
    the sync's state unless it runs."""
    if sync is None:
        return "-"
    lag = f"{sync['lag_bytes'] / 2**20:.1f} MiB {duration(sync['lag_seconds'])}"
    return lag if sync["state"] == "running" else f"{sync['state']} {lag}"


def mirror_lag(mirror: Info | None) -> str:
    """A VM's standby mirror (either end, docs/MIRROR.md) as `peer ls` shows it."""
    if mirror is None:
        return ""
    lag = f"{mirror['lag_bytes'] / 2**20:.1f} MiB {duration(mirror['lag_seconds'])}"
    state = "" if mirror["state"] == "running" else f" {mirror['state']}"
    return f"{mirror['role']}{state} {lag}"


def lags(vm: Info) -> str:
    """The SYNC/MIRROR LAG cell: the sync's, then the mirror's."""
    mirror = mirror_lag(vm.get("mirror"))
    sync = sync_lag(vm.get("sync"))
    return sync if not mirror else mirror if sync == "-" else f"{sync}; {mirror}"


def table(vms: list[Info], *, states: bool) -> Table:
    """The VMs (with `uptime_s`, see with_uptime) as a table; `states` (a peer's VMs)
    adds STATE (they may be starting, paused, in doubt, a standby mirror...) and SYNC/MIRROR
    LAG (docs/SYNC.md, docs/MIRROR.md)."""
    grid = Table("NAME", *(["STATE"] if states else []), "UP", "MEMORY", "CPUS", "DIRTY",
                 *(["SYNC/MIRROR LAG"] if states else []), "ACCEL", "PUBLISH", "PID")
    for vm in vms:
        ports = ", ".join(f"{p['host_addr']}:{p['host_port']}->{p['guest_port']}/"
                          f"{p['protocol']}" for p in vm.get("publish") or [])
        memory = vm.get("memory_mib")
        grid.add_row(vm["name"], *([vm.get("state") or "-"] if states else []),
                     duration(vm.get("uptime_s")),
                     "-" if memory is None else f"{memory} MiB",
                     str(vm.get("cpus") or "-"), rate(vm.get("dirty_rate")),
                     *([lags(vm)] if states else []),
                     vm.get("accel") or "-", ports, str(vm.get("pid") or "-"))
    return grid
