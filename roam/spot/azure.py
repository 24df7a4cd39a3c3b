"""Azure: Scheduled Events from the Instance Metadata Service, as Microsoft documents them.

`GET /metadata/scheduledevents?api-version=2020-07-01` with `Metadata: true` (400
without it) answers `{"DocumentIncarnation": N, "Events": [...]}`; each event has an
EventId, an EventType (Freeze, Reboot, Redeploy, Preempt, Terminate), ResourceType
"VirtualMachine", Resources (the names of the VMs it affects: events of a whole
availability set or scale set reach every member, so a VM must look for its own name),
EventStatus (Scheduled, then Started), NotBefore (an RFC 1123 time such as "Mon, 19 Sep
2016 18:29:47 GMT"; empty once Started). A spot VM's eviction is Preempt, at least 30 s
ahead; a scale set's Terminate is 5 to 15 min ahead. Posting
`{"StartRequests": [{"EventId": ...}]}` to the same URL tells Azure it may go ahead
now: the node does it once its VMs are gone. That starts the event for every VM in its
Resources, not only this one.

The first request of a VM enables Scheduled Events and may take up to two minutes.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
import string
from collections.abc import Callable
from typing import Annotated

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from roam.spot.config import AZURE_API_VERSION, AZURE_COMPUTE_API_VERSION, WatchConfig
from roam.spot.errors import BadMetadata
from roam.spot.http import Response, fetch, invalid, unexpected
from roam.spot.notice import Action, Cloud, Notice, check_deadline

__all__ = ["EVENTS_PATH", "NAME_PATH", "AzureSource", "acknowledgement", "parse_events",
           "parse_name"]

EVENTS_PATH = "/metadata/scheduledevents"
NAME_PATH = "/metadata/instance/compute/name"
HEADERS = {"Metadata": "true"}
ACTIONS = {"Preempt": Action.PREEMPT, "Terminate": Action.TERMINATE}
"""The event types that take the VM away; Freeze, Reboot and Redeploy leave it (and
its memory, or at least its disks) where it is."""
_NOT_BEFORE = re.compile(r"[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} "
                         r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT")
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")

Short = Annotated[str, Field(max_length=256)]


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    EventId: Annotated[str, Field(min_length=1, max_length=256)]
    EventType: Short
    ResourceType: Short
    Resources: Annotated[list[Short], Field(max_length=1000)]
    EventStatus: Short
    NotBefore: Short
    Description: Annotated[str, Field(max_length=4096)] = ""
    EventSource: Short = ""
    DurationInSeconds: int = -1


class _Document(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    DocumentIncarnation: int
    Events: Annotated[list[_Event], Field(max_length=100)]


def _not_before(event: _Event, now: dt.datetime) -> dt.datetime:
    if event.NotBefore == "":
        if event.EventStatus != "Started":
            raise BadMetadata(f"scheduled events: {event.EventType} event without NotBefore "
                              "that has not started")
        return now  # it has begun: the VM goes any moment
    if not _NOT_BEFORE.fullmatch(event.NotBefore):
        raise BadMetadata("scheduled events: NotBefore is not an RFC 1123 time")
    try:
        return email.utils.parsedate_to_datetime(event.NotBefore).astimezone(dt.UTC)
    except (ValueError, TypeError, OverflowError):
        raise BadMetadata("scheduled events: NotBefore is not a valid date") from None


def parse_events(response: Response, *, resource: str, now: dt.datetime, skew: float,
                 horizon: float) -> list[Notice]:
    """The notices for `resource` in a scheduled events document: its Preempt and
    Terminate events, in the document's order. Other types, and events for other VMs,
    are not notices of this node."""
    if response.status == 400:
        raise BadMetadata("scheduled events: bad request (HTTP 400): the Metadata: true "
                          "header or the api-version was refused")
    if response.status != 200:
        raise unexpected("scheduled events", response)
    try:
        document = _Document.model_validate_json(response.body)
    except ValidationError as exc:
        raise invalid("scheduled events", exc) from None
    if len({event.EventId for event in document.Events}) < len(document.Events):
        raise BadMetadata("scheduled events: an EventId is repeated (it is documented "
                          "as globally unique)")
    notices = []
    for event in document.Events:
        action = ACTIONS.get(event.EventType)
        if action is None or resource not in event.Resources:
            continue
        if event.EventStatus not in ("Scheduled", "Started"):
            raise BadMetadata("scheduled events: EventStatus is neither Scheduled nor "
                              "Started")
        deadline = check_deadline(_not_before(event, now), now, skew=skew, horizon=horizon)
        notices.append(Notice(cloud=Cloud.AZURE, action=action, deadline=deadline,
                              event_id=event.EventId, seen=now))
    return notices


def parse_name(response: Response) -> str:
    """This VM's name, from IMDS's compute/name in text format."""
    if response.status != 200:
        raise unexpected("compute name", response)
    name = response.body.strip().decode("latin-1")
    if not 0 < len(name) <= 256 or not set(name) <= _NAME_CHARS:
        raise BadMetadata("compute name: the answer is not a VM name")
    return name


def acknowledgement(event_id: str) -> bytes:
    """The body that starts an event now (StartRequests)."""
    return json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()


class AzureSource:
    """Polls the scheduled events document; learns this VM's name first unless the
    configuration gives it."""

    cloud = Cloud.AZURE

    def __init__(self, http: httpx.AsyncClient, config: WatchConfig,
                 clock: Callable[[], dt.datetime]) -> None:
        self._http = http
        self._config = config
        self._clock = clock
        self.resource = config.azure_resource

    def pause(self, elapsed: float) -> float:
        return max(0.0, self._config.interval - elapsed)

    async def _resource(self) -> str:
        if self.resource is None:
            response = await fetch(self._http, "GET", NAME_PATH, headers=HEADERS,
                                   params={"api-version": AZURE_COMPUTE_API_VERSION,
                                           "format": "text"},
                                   max_body=self._config.max_body)
            self.resource = parse_name(response)
        return self.resource

    async def poll(self) -> list[Notice]:
        resource = await self._resource()
        response = await fetch(self._http, "GET", EVENTS_PATH, headers=HEADERS,
                               params={"api-version": AZURE_API_VERSION},
                               max_body=self._config.max_body)
        return parse_events(response, resource=resource, now=self._clock(),
                            skew=self._config.skew, horizon=self._config.horizon)

    async def acknowledge(self, notice: Notice) -> None:
        """Start the event now (the node is ready to go); MetadataError if Azure did not
        take it."""
        response = await fetch(self._http, "POST", EVENTS_PATH,
                               headers={**HEADERS, "Content-Type": "application/json"},
                               params={"api-version": AZURE_API_VERSION},
                               content=acknowledgement(notice.event_id),
                               max_body=self._config.max_body)
        if not 200 <= response.status < 300:
            raise unexpected("start request", response)
