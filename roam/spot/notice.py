"""A spot notice: the cloud will take this machine away at a known moment.

Every cloud says it its own way (roam.spot.aws, .gcp, .azure parse them); a `Notice` is
what they all become, so that the node agent handles one type: which cloud, what the
cloud will do, the deadline as an absolute UTC time, and the cloud's own name for the
event (used to deliver each notice once, and on Azure to acknowledge it).
"""

from __future__ import annotations

import datetime as dt
import enum

from pydantic import AwareDatetime, BaseModel, ConfigDict

from roam.spot.errors import BadMetadata

__all__ = ["Action", "Cloud", "Notice", "check_deadline"]


class Cloud(enum.StrEnum):
    """Where the node runs, that is: which metadata service to watch."""

    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"
    NONE = "none"  # not a spot instance, or no metadata service: nothing to watch


class Action(enum.StrEnum):
    """What the cloud will do at the deadline, in roam's words."""

    TERMINATE = "terminate"  # AWS terminate; Azure Terminate (scale set deletes the VM)
    STOP = "stop"  # AWS stop: memory is lost, disks stay
    HIBERNATE = "hibernate"  # AWS hibernate: begins at once, no two-minute warning
    PREEMPT = "preempt"  # GCP preempted, Azure Preempt: the spot VM is taken away


class Notice(BaseModel):
    """One spot notice, delivered once by the watcher."""

    model_config = ConfigDict(frozen=True)

    cloud: Cloud
    action: Action
    deadline: AwareDatetime
    """When the cloud acts (UTC). GCP gives no time: there it is `seen` plus the
    documented 30 s (configurable)."""
    event_id: str
    """The cloud's name for this notice: Azure's EventId, GCP's ETag of the response
    that said TRUE, AWS's action and time (AWS has no identifier)."""
    seen: AwareDatetime
    """When this host first read the notice (UTC)."""

    def remaining(self, now: dt.datetime | None = None) -> dt.timedelta:
        """Time left before the deadline (negative once it passed)."""
        return self.deadline - (now or dt.datetime.now(dt.UTC))


def check_deadline(deadline: dt.datetime, now: dt.datetime, *, skew: float,
                   horizon: float) -> dt.datetime:
    """`deadline` if it is plausible, else BadMetadata: more than `skew` seconds in the
    past (a stale notice: AWS documents that a failed termination leaves the old time in
    place) or more than `horizon` seconds ahead (no spot notice gives that long)."""
    ahead = (deadline - now).total_seconds()
    # The messages name the deadline, not how far it is: the same stale notice polled
    # again is the same problem, logged once.
    if ahead < -skew:
        raise BadMetadata(f"deadline {deadline.isoformat()} is in the past: a stale notice")
    if ahead > horizon:
        raise BadMetadata(f"deadline {deadline.isoformat()} is more than {horizon:.0f} s "
                          "ahead, which no spot notice gives")
    return deadline
