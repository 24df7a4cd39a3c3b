"""Every metadata parser, fuzzed: random statuses, headers and bodies (garbage, JSON of
any shape, near-misses of the documented documents). A parser returns what the document
says or raises a MetadataError, nothing else; a notice comes only from a document that
is one, checked here independently of the parser."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from roam.spot.aws import parse_instance_action, parse_token
from roam.spot.azure import parse_events, parse_name
from roam.spot.errors import MetadataError, TokenRejected
from roam.spot.gcp import parse_preempted
from roam.spot.http import Response
from roam.spot.notice import Action, Cloud

NOW = dt.datetime(2026, 12, 1, 17, 0, 0, tzinfo=dt.UTC)
SKEW, HORIZON = 5.0, 3600.0
AWS_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")

statuses = st.one_of(st.sampled_from([200, 200, 200, 400, 401, 403, 404, 429, 500, 503]),
                     st.integers(100, 599))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                max_size=4),
    max_leaves=12)
# deadlines around the plausible window, on either side of each edge
offsets = st.one_of(st.floats(-2 * SKEW, 2 * HORIZON), st.floats(-1e9, 1e9),
                    st.sampled_from([-SKEW, -SKEW - 1, 0.0, HORIZON, HORIZON + 1]))


def aws_time(offset: float) -> str:
    try:
        return (NOW + dt.timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%SZ")
    except OverflowError:
        return "9999-12-31T23:59:59Z"


def rfc1123(offset: float) -> str:
    try:
        return email.utils.format_datetime(NOW + dt.timedelta(seconds=offset), usegmt=True)
    except OverflowError:
        return "Fri, 31 Dec 9999 23:59:59 GMT"


def dumped(value: Any) -> bytes:
    return json.dumps(value).encode()


aws_documents = st.fixed_dictionaries(
    {"action": st.sampled_from(["terminate", "stop", "hibernate"]) | json_values,
     "time": offsets.map(aws_time) | json_values},
    optional={"extra": json_values}).map(dumped)
bodies = st.one_of(st.binary(max_size=300), json_values.map(dumped), aws_documents)
headers = st.dictionaries(st.sampled_from(["metadata-flavor", "etag", "content-type",
                                           "x-other"]),
                          st.sampled_from(["Google", "google", "", "abc123", "x y"])
                          | st.text(max_size=20), max_size=4)


def plausible(deadline: dt.datetime) -> bool:
    return -SKEW <= (deadline - NOW).total_seconds() <= HORIZON


@settings(max_examples=400, deadline=None)
@given(statuses, headers, bodies)
def test_aws_instance_action(status: int, head: dict[str, str], body: bytes) -> None:
    try:
        notice = parse_instance_action(Response(status, head, body), now=NOW, skew=SKEW,
                                       horizon=HORIZON)
    except TokenRejected:
        assert status == 401
        return
    except MetadataError:
        return
    if notice is None:
        assert status == 404
        return
    document = json.loads(body)  # a notice only from the documented document
    assert status == 200 and isinstance(document, dict)
    assert document["action"] in ("terminate", "stop", "hibernate")
    assert isinstance(document["time"], str) and AWS_TIME.fullmatch(document["time"])
    assert notice.cloud is Cloud.AWS and notice.action == document["action"]
    assert notice.deadline.strftime("%Y-%m-%dT%H:%M:%SZ") == document["time"]
    assert plausible(notice.deadline)


@given(st.sampled_from(["terminate", "stop", "hibernate"]), st.integers(-5, 3600))
def test_aws_documented_notice_round_trips(action: str, offset: int) -> None:
    body = dumped({"action": action, "time": aws_time(offset)})
    notice = parse_instance_action(Response(200, {}, body), now=NOW, skew=SKEW,
                                   horizon=HORIZON)
    assert notice is not None
    assert notice.action is Action(action)
    assert notice.deadline == NOW + dt.timedelta(seconds=offset)


@settings(max_examples=300, deadline=None)
@given(statuses, st.binary(max_size=200) | st.text(max_size=60).map(str.encode))
def test_aws_token(status: int, body: bytes) -> None:
    try:
        token = parse_token(Response(status, {}, body))
    except MetadataError:
        return
    assert status == 200 and token == body.strip().decode() and token.isprintable()
    assert " " not in token and token  # fit for a header


gcp_bodies = st.one_of(st.sampled_from([b"TRUE", b"FALSE", b"TRUE\n", b"true", b""]),
                       st.binary(max_size=50))
gcp_headers = st.fixed_dictionaries(
    {}, optional={"metadata-flavor": st.sampled_from(["Google", "google", "Goggle", ""]),
                  "etag": st.sampled_from(["0123abcd", "", "a b", "x" * 200])
                  | st.text(max_size=40)})


@settings(max_examples=400, deadline=None)
@given(statuses, gcp_headers, gcp_bodies)
def test_gcp_preempted(status: int, head: dict[str, str], body: bytes) -> None:
    try:
        preempted, etag = parse_preempted(Response(status, head, body))
    except MetadataError:
        return
    assert status == 200 and head.get("metadata-flavor") == "Google"
    assert etag == head["etag"] and etag.isprintable() and " " not in etag
    assert body.strip() == (b"TRUE" if preempted else b"FALSE")


RESOURCES = ["roam-node", "roam-other", "", "ROAM-NODE"]
azure_events = st.fixed_dictionaries(
    {"EventId": st.sampled_from(["e1", "e2", ""]) | json_values,
     "EventType": st.sampled_from(["Preempt", "Terminate", "Reboot", "Freeze",
                                   "Redeploy"]) | json_values,
     "ResourceType": st.just("VirtualMachine") | json_values,
     "Resources": st.lists(st.sampled_from(RESOURCES), max_size=3) | json_values,
     "EventStatus": st.sampled_from(["Scheduled", "Started", "Completed"]) | json_values,
     "NotBefore": st.one_of(offsets.map(rfc1123), st.just(""), st.text(max_size=30),
                            json_values)},
    optional={"Description": json_values, "EventSource": st.just("Platform"),
              "DurationInSeconds": st.integers() | json_values})
likely_events = st.fixed_dictionaries(  # documented shape, values varied
    {"EventId": st.text(min_size=1, max_size=8),
     "EventType": st.sampled_from(["Preempt", "Terminate", "Reboot"]),
     "ResourceType": st.just("VirtualMachine"),
     "Resources": st.lists(st.sampled_from(RESOURCES), min_size=1, max_size=3),
     "EventStatus": st.sampled_from(["Scheduled", "Started"]),
     "NotBefore": st.one_of(st.floats(-2 * SKEW, 2 * HORIZON).map(rfc1123), st.just(""))})
azure_documents = st.one_of(
    st.fixed_dictionaries({"DocumentIncarnation": st.integers(),
                           "Events": st.lists(likely_events, max_size=3)}),
    st.fixed_dictionaries({"DocumentIncarnation": st.integers() | json_values,
                           "Events": st.lists(likely_events | azure_events, max_size=3)
                           | json_values})).map(dumped)


@settings(max_examples=500, deadline=None)
@given(statuses, st.one_of(azure_documents, st.binary(max_size=200),
                           json_values.map(dumped)))
def test_azure_events(status: int, body: bytes) -> None:
    try:
        notices = parse_events(Response(status, {}, body), resource="roam-node", now=NOW,
                               skew=SKEW, horizon=HORIZON)
    except MetadataError:
        return
    assert status == 200 or not notices
    if not notices:
        return
    document = json.loads(body)
    assert isinstance(document["DocumentIncarnation"], int)
    events = {e["EventId"]: e for e in document["Events"]}
    for notice in notices:  # each one is a Preempt or Terminate event naming this VM
        event = events[notice.event_id]
        assert event["EventType"] in ("Preempt", "Terminate")
        assert "roam-node" in event["Resources"]
        assert event["EventStatus"] in ("Scheduled", "Started")
        assert notice.action is (Action.PREEMPT if event["EventType"] == "Preempt"
                                 else Action.TERMINATE)
        if event["NotBefore"]:
            expected = email.utils.parsedate_to_datetime(event["NotBefore"])
            assert notice.deadline == expected
        else:
            assert event["EventStatus"] == "Started" and notice.deadline == NOW
        assert plausible(notice.deadline)


@given(st.integers(-5, 3600), st.sampled_from(["Preempt", "Terminate"]))
def test_azure_documented_notice_round_trips(offset: int, kind: str) -> None:
    body = dumped({"DocumentIncarnation": 3, "Events": [
        {"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": kind,
         "ResourceType": "VirtualMachine", "Resources": ["roam-other", "roam-node"],
         "EventStatus": "Scheduled", "NotBefore": rfc1123(offset), "Description": "",
         "EventSource": "Platform", "DurationInSeconds": -1},
        {"EventId": "other", "EventType": "Reboot", "ResourceType": "VirtualMachine",
         "Resources": ["roam-node"], "EventStatus": "Scheduled",
         "NotBefore": rfc1123(offset)}]})
    [notice] = parse_events(Response(200, {}, body), resource="roam-node", now=NOW,
                            skew=SKEW, horizon=HORIZON)
    assert notice.deadline == NOW + dt.timedelta(seconds=offset)
    assert notice.event_id == "602d9444-d2cd-49c7-8624-8643e7171297"


@settings(max_examples=200, deadline=None)
@given(statuses, st.binary(max_size=300) | st.text(max_size=40).map(str.encode))
def test_azure_name(status: int, body: bytes) -> None:
    try:
        name = parse_name(Response(status, {}, body))
    except MetadataError:
        return
    assert status == 200 and name == body.strip().decode() and name
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name)
