"""The fake metadata service answers as the clouds document, refuses what they refuse,
and its control parser takes only what it describes (fuzzed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.spot import Cloud
from roam.spot.aws import ACTION_PATH, TOKEN_HEADER, TOKEN_PATH, TTL_HEADER
from roam.spot.azure import EVENTS_PATH, NAME_PATH
from roam.spot.fake import FakeMetadata, serve
from roam.spot.gcp import PREEMPTED_PATH
from tests.spot.conftest import Fake


@pytest.fixture
async def http(fake: Fake) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, trust_env=False) as client:
        yield client


async def test_aws_token_rules(http: httpx.AsyncClient) -> None:
    assert (await http.put(TOKEN_PATH)).status_code == 400
    for ttl in ("0", "21601", "x", "-1"):
        assert (await http.put(TOKEN_PATH, headers={TTL_HEADER: ttl})).status_code == 400
    forwarded = {TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.1"}
    assert (await http.put(TOKEN_PATH, headers=forwarded)).status_code == 403
    answer = await http.put(TOKEN_PATH, headers={TTL_HEADER: "21600"})
    assert answer.status_code == 200 and answer.headers[TTL_HEADER] == "21600"
    token = answer.text
    assert (await http.get(ACTION_PATH)).status_code == 401
    assert (await http.get(ACTION_PATH, headers={TOKEN_HEADER: "forged"})).status_code == 401
    assert (await http.get(ACTION_PATH, headers={TOKEN_HEADER: token})).status_code == 404


async def test_aws_token_expires(fake: Fake, http: httpx.AsyncClient) -> None:
    token = (await http.put(TOKEN_PATH, headers={TTL_HEADER: "1"})).text
    fake.metadata.give_notice()
    answer = await http.get(ACTION_PATH, headers={TOKEN_HEADER: token})
    assert answer.status_code == 200 and json.loads(answer.text)["action"] == "terminate"
    fake.metadata.expire_tokens()
    assert (await http.get(ACTION_PATH, headers={TOKEN_HEADER: token})).status_code == 401


async def test_gcp_flavor_etag_and_hanging_get(fake: Fake, http: httpx.AsyncClient) -> None:
    assert (await http.get(PREEMPTED_PATH)).status_code == 403
    flavor = {"Metadata-Flavor": "Google"}
    answer = await http.get(PREEMPTED_PATH, headers=flavor)
    assert answer.text == "FALSE" and answer.headers["Metadata-Flavor"] == "Google"
    etag = answer.headers["ETag"]
    # a different ETag answers at once; the same one waits for the change
    stale = await http.get(PREEMPTED_PATH, headers=flavor, params={
        "wait_for_change": "true", "last_etag": "other"})
    assert stale.text == "FALSE"
    hanging = asyncio.create_task(http.get(PREEMPTED_PATH, headers=flavor, params={
        "wait_for_change": "true", "last_etag": etag, "timeout_sec": "30"}))
    await asyncio.sleep(0.05)
    assert not hanging.done()
    fake.metadata.give_notice()
    changed = await hanging
    assert changed.text == "TRUE" and changed.headers["ETag"] != etag
    timed_out = await http.get(PREEMPTED_PATH, headers=flavor, params={
        "wait_for_change": "true", "last_etag": changed.headers["ETag"], "timeout_sec": "1"})
    assert timed_out.text == "TRUE"


async def test_azure_header_version_and_start(fake: Fake, http: httpx.AsyncClient) -> None:
    version = {"api-version": "2020-07-01"}
    assert (await http.get(EVENTS_PATH, params=version)).status_code == 400
    assert (await http.get(EVENTS_PATH, headers={"Metadata": "true"})).status_code == 400
    headers = {"Metadata": "true"}
    empty = (await http.get(EVENTS_PATH, headers=headers, params=version)).json()
    assert empty["Events"] == []
    notice = fake.metadata.give_notice()
    document = (await http.get(EVENTS_PATH, headers=headers, params=version)).json()
    [event] = document["Events"]
    assert event["EventType"] == "Preempt" and "roam-node" in event["Resources"]
    assert document["DocumentIncarnation"] > empty["DocumentIncarnation"]
    start = {"StartRequests": [{"EventId": notice.event_id}]}
    assert (await http.post(EVENTS_PATH, params=version, json=start)).status_code == 400
    assert (await http.post(EVENTS_PATH, headers=headers, params=version,
                            json=start)).status_code == 200
    [started] = (await http.get(EVENTS_PATH, headers=headers, params=version)).json()[
        "Events"]
    assert started["EventStatus"] == "Started" and started["NotBefore"] == ""
    assert fake.metadata.acknowledged == [notice.event_id]
    name = await http.get(NAME_PATH, headers=headers,
                          params={"api-version": "2021-02-01", "format": "text"})
    assert name.text == "roam-node"


async def test_other_clouds_paths_are_absent() -> None:
    async with serve(FakeMetadata(frozenset({Cloud.AWS}))) as url, httpx.AsyncClient(
            base_url=url, trust_env=False) as http:
        answer = await http.get(PREEMPTED_PATH, headers={"Metadata-Flavor": "Google"})
        assert answer.status_code == 404


async def test_control_over_http(fake: Fake, http: httpx.AsyncClient) -> None:
    state = (await http.post("/_roam/notice", json={"deadline_seconds": 12,
                                                    "action": "stop"})).json()
    assert state["notice"]["action"] == "stop"
    assert (await http.post("/_roam/faults", json={"status": 503, "count": 1})).is_success
    assert (await http.put(TOKEN_PATH, headers={TTL_HEADER: "5"})).status_code == 503
    assert (await http.put(TOKEN_PATH, headers={TTL_HEADER: "5"})).status_code == 200
    assert (await http.delete("/_roam/notice")).json()["notice"] is None
    assert (await http.get("/_roam/state")).json()["requests"]["aws.token"] == 2


bodies = st.one_of(
    st.fixed_dictionaries({}, optional={
        "deadline_seconds": st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                                      st.integers(),
                                      st.text(max_size=5), st.none()),
        "action": st.sampled_from(["terminate", "stop", "hibernate", "x"]),
        "azure_event": st.sampled_from(["Preempt", "Terminate", "Reboot"]),
        "other": st.integers()}),
    st.recursive(st.none() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3), max_leaves=5))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_control_requests_fuzzed(body: object) -> None:
    """Bad control requests get 422 and change nothing; good ones give a notice."""
    async def run() -> None:
        fake = FakeMetadata()
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake") as http:
            answer = await http.post("/_roam/notice", json=body)
        if answer.status_code == 200:
            assert isinstance(body, dict) and set(body) <= {
                "deadline_seconds", "action", "azure_event"}
            assert fake.notice is not None
        else:
            assert answer.status_code == 422 and fake.notice is None
    asyncio.run(run())


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=100) | st.recursive(
    st.none() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["StartRequests", "EventId", "x"]), inner, max_size=3),
    max_leaves=6).map(lambda v: json.dumps(v).encode()))
def test_start_requests_fuzzed(body: bytes) -> None:
    """Azure's StartRequests parser of the fake: 200 and recorded, or 400 and not."""
    async def run() -> None:
        fake = FakeMetadata()
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake") as http:
            answer = await http.post(EVENTS_PATH, content=body, headers={"Metadata": "true"},
                                     params={"api-version": "2020-07-01"})
        assert answer.status_code in (200, 400)
        if answer.status_code == 400:
            assert fake.acknowledged == []
        else:
            requests = json.loads(body)["StartRequests"]
            assert fake.acknowledged == [r["EventId"] for r in requests]
    asyncio.run(run())
