"""A spot notice as the control plane keeps it, and how the evacuation it started goes.

The node agent (roam.control.watch) or an operator gives it (POST /nodes/{name}/notice,
`NoticeRequest`); roam.control.evacuation stores it as a `NoticeRecord` under
/notices/NODE and moves it on; GET /nodes/{name}/notice shows it.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from roam.spot import Action, Cloud

NOTICES = "/notices/"


def notice_key(node: str) -> str:
    return NOTICES + node


class NoticeRequest(BaseModel):
    """POST /nodes/{name}/notice: the node will be taken at a deadline."""

    model_config = ConfigDict(extra="forbid")

    deadline_seconds: Annotated[float | None, Field(
        gt=0, le=3600, description="seconds from now (this or deadline)")] = None
    deadline: Annotated[float | None, Field(
        gt=0, description="wall clock (seconds since the epoch, UTC)")] = None
    cloud: Cloud = Cloud.NONE
    action: Action = Action.TERMINATE
    event_id: Annotated[str, StringConstraints(max_length=200)] = ""
    max_parallel: Annotated[int, Field(ge=1, le=64)] = 2

    @model_validator(mode="after")
    def _one_deadline(self) -> NoticeRequest:
        if (self.deadline is None) == (self.deadline_seconds is None):
            raise ValueError("give deadline_seconds or deadline")
        if self.deadline is not None and not math.isfinite(self.deadline):
            raise ValueError("deadline must be a finite time")
        return self


class Leaving(enum.StrEnum):
    """Where one VM of an evacuation is."""

    WAITING = "waiting"  # on the node, its move not started
    MOVING = "moving"
    EVACUATED = "evacuated"  # runs elsewhere
    LOST = "lost"  # the deadline passed without it, or it stopped or failed
    GONE = "gone"  # deleted meanwhile
    HIBERNATING = "hibernating"  # no room or time: its node seals it to its store
    HIBERNATED = "hibernated"  # in its checkpoint store, restored where a node fits

    @property
    def final(self) -> bool:
        return self in (Leaving.EVACUATED, Leaving.LOST, Leaving.GONE, Leaving.HIBERNATED)


class VMEvacuation(BaseModel):
    state: Leaving = Leaving.WAITING
    priority: int = 0
    memory_mib: int
    estimate: float | None = None  # wall clock it should resume elsewhere by
    warned: bool = False  # its will_be_lost event went out
    to: str | None = None
    resumed_at: float | None = None
    margin_ms: float | None = None
    detail: str | None = None


class NoticeRecord(BaseModel):
    """A notice as stored, and how the evacuation it started goes."""

    node: str
    cloud: Cloud
    action: Action
    event_id: str
    deadline: float
    received: float
    max_parallel: int
    vms: dict[str, VMEvacuation]
    finished: float | None = None

    @property
    def evacuated(self) -> list[str]:
        return [n for n, v in self.vms.items() if v.state == Leaving.EVACUATED]

    @property
    def hibernated(self) -> list[str]:
        return [n for n, v in self.vms.items() if v.state == Leaving.HIBERNATED]

    @property
    def lost(self) -> list[str]:
        return [n for n, v in self.vms.items() if v.state == Leaving.LOST]


def order(record: NoticeRecord) -> list[str]:
    """Highest priority first, then by name."""
    return sorted(record.vms, key=lambda n: (-record.vms[n].priority, n))


def summary(record: NoticeRecord) -> str:
    margins = [v.margin_ms for v in record.vms.values() if v.margin_ms is not None]
    text = f"{len(record.evacuated)} evacuated, {len(record.lost)} lost"
    if record.hibernated:
        text += f", {len(record.hibernated)} hibernated"
    if margins:
        text += f"; smallest margin {min(margins) / 1000:.1f} s"
    return text
