"""Each cloud's watcher against the fake metadata service over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket

import pytest
from prometheus_client import REGISTRY

from roam.spot import (
    Action,
    BadConfig,
    BadMetadata,
    Cloud,
    MetadataUnavailable,
    WatchConfig,
    Watcher,
    WatchState,
)
from roam.spot.fake import FaultRequest, NoticeRequest
from tests.spot.conftest import FAST, ROUTE, Fake, running, until

CLOUDS = [Cloud.AWS, Cloud.GCP, Cloud.AZURE]


@pytest.mark.parametrize("cloud", CLOUDS)
async def test_no_notice_gives_nothing(fake: Fake, cloud: Cloud) -> None:
    async with running(fake.config(cloud)) as run:
        await until(lambda: fake.metadata.requests[ROUTE[cloud]] >= 2)
        fake.metadata.withdraw()  # a change that is no notice (GCP answers FALSE again)
        await until(lambda: fake.metadata.requests[ROUTE[cloud]] >= 3)
        assert run.watcher.state is WatchState.WATCHING
    assert run.notices == []
    assert not fake.metadata.refused


@pytest.mark.parametrize("cloud", CLOUDS)
async def test_notice_is_delivered_once_with_its_deadline(fake: Fake, cloud: Cloud) -> None:
    def counted() -> float:
        value = REGISTRY.get_sample_value("roam_spot_notices_total", {"cloud": cloud.value})
        return value or 0.0

    before = counted()
    async with running(fake.config(cloud)) as run:
        await until(lambda: run.watcher.state is WatchState.WATCHING)
        given = fake.metadata.give_notice(NoticeRequest(deadline_seconds=30))
        await until(lambda: len(run.notices) == 1)
        polls = fake.metadata.requests[ROUTE[cloud]]
        if cloud is Cloud.GCP:  # hanging GET: make it answer again (TRUE, a new ETag)
            fake.metadata.give_notice(NoticeRequest(deadline_seconds=30))
        more = 1 if cloud is Cloud.GCP else 2
        await until(lambda: fake.metadata.requests[ROUTE[cloud]] >= polls + more)
    [notice] = run.notices
    assert notice.cloud is cloud
    if cloud is Cloud.GCP:  # GCP says only TRUE; the deadline is the documented 30 s
        assert notice.action is Action.PREEMPT
        assert notice.deadline - notice.seen == dt.timedelta(seconds=30)
        assert abs((notice.deadline - given.deadline).total_seconds()) < 2
    else:
        assert notice.action is (Action.TERMINATE if cloud is Cloud.AWS else Action.PREEMPT)
        assert notice.deadline == given.deadline
    assert notice.seen < notice.deadline
    assert counted() == before + 1
    assert run.watcher.delivered == [notice]


async def test_aws_actions_are_reported_as_given(fake: Fake) -> None:
    async with running(fake.config(Cloud.AWS)) as run:
        fake.metadata.give_notice(NoticeRequest(deadline_seconds=60, action="stop"))
        await until(lambda: len(run.notices) == 1)
        # a changed notice is a new notice (AWS has no identifier but action and time)
        fake.metadata.give_notice(NoticeRequest(deadline_seconds=5, action="hibernate"))
        await until(lambda: len(run.notices) == 2)
    assert [n.action for n in run.notices] == [Action.STOP, Action.HIBERNATE]


async def test_aws_token_renewed_before_it_expires(fake: Fake) -> None:
    # A 1 s token is renewed after half its life: polls never carry an expired one.
    async with running(fake.config(Cloud.AWS, token_ttl=1)) as run:
        await until(lambda: fake.metadata.tokens_issued >= 3)
        fake.metadata.give_notice()
        await until(lambda: len(run.notices) == 1)
    assert fake.metadata.refused["aws.instance-action"] == 0


async def test_aws_token_rejected_gets_a_new_one(fake: Fake) -> None:
    async with running(fake.config(Cloud.AWS)) as run:
        await until(lambda: fake.metadata.requests["aws.instance-action"] >= 2)
        fake.metadata.expire_tokens()  # as if it had expired early: the next GET gets 401
        await until(lambda: fake.metadata.tokens_issued == 2)
        fake.metadata.give_notice()
        await until(lambda: len(run.notices) == 1)
        assert run.watcher.state is WatchState.WATCHING
    assert fake.metadata.refused["aws.instance-action"] == 1


async def test_azure_acknowledgement_is_sent_and_the_started_event_is_not_new(
        fake: Fake) -> None:
    async with running(fake.config(Cloud.AZURE)) as run:
        given = fake.metadata.give_notice()
        await until(lambda: len(run.notices) == 1)
        await run.watcher.acknowledge(run.notices[0])
        assert fake.metadata.acknowledged == [given.event_id]
        assert given.started  # Azure starts it: Started, NotBefore empty, same EventId
        polls = fake.metadata.requests["azure.events"]
        await until(lambda: fake.metadata.requests["azure.events"] >= polls + 2)
    assert len(run.notices) == 1
    assert run.notices[0].event_id == given.event_id
    assert fake.metadata.requests["azure.name"] == 1  # the VM's name, asked once


async def test_azure_events_for_other_vms_are_not_notices(fake: Fake) -> None:
    async with running(fake.config(Cloud.AZURE, azure_resource="someone-else")) as run:
        fake.metadata.give_notice()
        await until(lambda: fake.metadata.requests["azure.events"] >= 3)
    assert run.notices == []
    assert fake.metadata.requests["azure.name"] == 0  # configured: IMDS not asked


async def test_azure_acknowledgement_refused_is_a_typed_error(fake: Fake) -> None:
    async with running(fake.config(Cloud.AZURE)) as run:
        fake.metadata.give_notice()
        await until(lambda: len(run.notices) == 1)
        fake.metadata.set_fault(FaultRequest(status=500, route="azure.start"))
        with pytest.raises(MetadataUnavailable):
            await run.watcher.acknowledge(run.notices[0])
        fake.metadata.set_fault(FaultRequest(status=403, route="azure.start"))
        with pytest.raises(BadMetadata):
            await run.watcher.acknowledge(run.notices[0])
        await run.watcher.acknowledge(run.notices[0])  # the fault used up: taken
    assert fake.metadata.acknowledged == [run.notices[0].event_id]


async def test_acknowledge_is_a_no_op_elsewhere(fake: Fake) -> None:
    async with running(fake.config(Cloud.AWS)) as run:
        fake.metadata.give_notice()
        await until(lambda: len(run.notices) == 1)
        await run.watcher.acknowledge(run.notices[0])
    assert fake.metadata.acknowledged == []


@pytest.mark.parametrize("cloud", CLOUDS)
async def test_server_failing_is_retried_and_never_a_notice(fake: Fake, cloud: Cloud,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    caplog.set_level(logging.DEBUG, "roam.spot")
    fake.metadata.set_fault(FaultRequest(status=503, count=4))
    async with running(fake.config(cloud)) as run:
        await until(lambda: run.watcher.state is WatchState.WATCHING)
        fake.metadata.give_notice()
        await until(lambda: len(run.notices) == 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "unavailable" in r.getMessage()]
    assert len(warnings) == 1, warnings  # logged once, retried four times
    assert sum(fake.metadata.requests.values()) >= 5


@pytest.mark.parametrize("cloud", CLOUDS)
async def test_slow_server_times_out_and_is_retried(fake: Fake, cloud: Cloud) -> None:
    fake.metadata.set_fault(FaultRequest(delay_seconds=0.5))
    async with running(fake.config(cloud, timeout=0.1)) as run:
        await until(lambda: run.watcher.state is WatchState.UNREACHABLE)
        fake.metadata.set_fault(FaultRequest())
        await until(lambda: run.watcher.state is WatchState.WATCHING)
        fake.metadata.give_notice()
        await until(lambda: len(run.notices) == 1)


async def test_server_down_is_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "roam.spot")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = WatchConfig(Cloud.AWS, metadata=f"http://127.0.0.1:{port}", **FAST)
    async with running(config) as run:
        await until(lambda: len(caplog.records) >= 4)
        assert run.watcher.state is WatchState.UNREACHABLE
    assert run.notices == []
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


GARBAGE = [
    (Cloud.AWS, '{"action": "terminate", "time": 1}'),  # wrong type
    (Cloud.AWS, '{"action": "terminate", "time": "2017-09-18T08:22:00Z"}'),  # stale
    (Cloud.AWS, '{"action": "terminate", "time": "2999-09-18T08:22:00Z"}'),  # absurd
    (Cloud.AWS, '{"action": "reboot", "time": "2017-09-18T08:22:00Z"}'),
    (Cloud.AWS, "x" * (64 * 1024 + 1)),  # oversize
    (Cloud.GCP, "TRUE"),  # without Metadata-Flavor: Google, so not from GCE's server
    (Cloud.AZURE, '{"DocumentIncarnation": 1, "Events": [{"EventId": "1", '
     '"EventType": "Preempt", "ResourceType": "VirtualMachine", "Resources": '
     '["roam-node"], "EventStatus": "Scheduled", "NotBefore": "Mon, 19 Sep 2016 '
     '18:29:47 GMT"}]}'),  # stale
    (Cloud.AZURE, '{"DocumentIncarnation": "1", "Events": []}'),
]


@pytest.mark.parametrize(("cloud", "body"), GARBAGE)
async def test_garbage_is_logged_once_and_never_a_notice(fake: Fake, cloud: Cloud, body: str,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    caplog.set_level(logging.DEBUG, "roam.spot")
    fake.metadata.give_notice()  # a notice is there, but what comes back is garbage
    fake.metadata.set_fault(FaultRequest(status=200, body=body, count=1000,
                                         route=ROUTE[cloud]))
    async with running(fake.config(cloud)) as run:
        await until(lambda: fake.metadata.requests[ROUTE[cloud]] >= 4)
        assert run.watcher.state is WatchState.BAD_METADATA
    assert run.notices == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings


async def test_cancelling_leaves_no_task_behind(fake: Fake) -> None:
    before = asyncio.all_tasks()
    async with running(fake.config(Cloud.GCP)) as run:  # cancelled inside a hanging GET
        await until(lambda: fake.metadata.requests["gcp.preempted"] >= 2)
    left = {task.get_coro().__qualname__ for task in asyncio.all_tasks() - before}
    assert run.notices == []
    assert left <= {"RequestResponseCycle.run_asgi"}, left  # the fake's side of the GET


async def test_cloud_none_watches_nothing_until_cancelled() -> None:
    async with Watcher(WatchConfig(Cloud.NONE)) as watcher:
        assert watcher.state is WatchState.IDLE
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                async for _ in watcher:
                    raise AssertionError("cloud none gave a notice")


@pytest.mark.parametrize("changes", [
    {"metadata": "ftp://169.254.169.254"}, {"metadata": "http://169.254.169.254/latest"},
    {"metadata": "169.254.169.254"}, {"token_ttl": 0}, {"token_ttl": 21601},
    {"interval": 0.0}, {"timeout": -1.0}, {"skew": -1.0}])
def test_config_that_cannot_work_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(BadConfig):
        WatchConfig(Cloud.AWS, **changes)  # type: ignore[arg-type]
