"""The dashboard without a browser, in process on a real SQLite store: nothing is served
without a session, a bad token gets no cookie, the cookie is HttpOnly and SameSite=Strict
(and Secure over TLS), an action without the form's csrf field or from another site is
refused and changes nothing (fuzzed with hypothesis), a good one is the API's request;
the stream sends the sections that changed and ends once the token is revoked; the
board folds the event log into migrations, history and evacuations, and the plots draw
one mark per migration.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.control import auth
from roam.control.dashboard import plots, session
from roam.control.dashboard.board import Board
from roam.control.dashboard.routes import SECTIONS
from roam.control.models import ControlKind, Keys, NodeRecord, RelayedEvent, VMPhase, VMRecord
from roam.control.serve import listen_socket
from roam.peer import api as peer_api
from roam.peer.models import OutcomeEvent, ProgressEvent
from tests.control.test_api import Control

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    opened = await Control.open(tmp_path / "data")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def browser(control: Control) -> AsyncIterator[httpx.AsyncClient]:
    """The same server as a browser talks to it: cookies, no Authorization header."""
    async with httpx.AsyncClient(transport=control.http._transport,
                                 base_url="http://control") as client:
        yield client


async def running_on_a(control: Control) -> None:
    """Nodes a and b, VM web running on a."""
    lease_a = await control.join("a", "0.01")
    await control.join("b", "0.02")
    await control.call("POST", "/vms", {"name": "web", "package": "/pkg", "memory_mib": 256},
                       expect=201)
    await control.reconciler.reconcile()
    await control.beat("a", lease_a, ["web"])
    await control.reconciler.reconcile()


async def log_in(control: Control, browser: httpx.AsyncClient) -> str:
    """Log in as the browser would; the csrf field of the rendered page."""
    answer = await browser.post("/login", content=f"token={control.token}", headers=FORM)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    page = await browser.get("/")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None
    return found.group(1)


async def test_nothing_is_served_without_a_session(
        control: Control, browser: httpx.AsyncClient) -> None:
    page = await browser.get("/")
    assert page.status_code == 303 and page.headers["location"] == "/login"
    stream = await browser.get("/ui/stream")
    assert stream.status_code == 401
    browser.cookies.set(session.COOKIE, "roam_forged")
    page = await browser.get("/")
    assert page.status_code == 303 and page.headers["location"] == "/login"
    login = await browser.get("/login")
    assert login.status_code == 200 and 'name="token"' in login.text
    framed(login)


def framed(page: httpx.Response) -> None:
    """The page may load only this server's assets, and never in a frame."""
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"


async def test_a_bad_token_gets_no_cookie_and_a_good_one_a_strict_httponly_cookie(
        control: Control, browser: httpx.AsyncClient) -> None:
    answer = await browser.post("/login", content="token=roam_wrong", headers=FORM)
    assert answer.status_code == 401
    assert "not valid" in answer.text and "set-cookie" not in answer.headers
    answer = await browser.post("/login", content=f"token={control.token}",
                                     headers=FORM)
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303 and cookie.startswith(f"{session.COOKIE}=")
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert "secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    over_tls = httpx.AsyncClient(transport=control.http._transport,
                                 base_url="https://control")
    async with over_tls:
        answer = await over_tls.post("/login", content=f"token={control.token}",
                                     headers=FORM)
    assert "secure" in {a.strip().lower() for a in answer.headers["set-cookie"].split(";")}
    answer = await browser.post("/login", content=f"token={control.token}",
                                     headers={**FORM, "Sec-Fetch-Site": "cross-site"})
    assert answer.status_code == 401  # a login another site's page posts is refused


async def test_the_page_shows_both_nodes_and_the_vm(
        control: Control, browser: httpx.AsyncClient) -> None:
    await running_on_a(control)
    await log_in(control, browser)
    page = (await browser.get("/")).text
    assert 'data-node="a"' in page and 'data-node="b"' in page
    assert 'data-vm="web"' in page and 'data-phase="running"' in page
    assert "$0.01/h" in page
    framed(await browser.get("/"))


async def test_actions_from_elsewhere_are_refused_and_change_nothing(
        control: Control, browser: httpx.AsyncClient) -> None:
    await running_on_a(control)
    csrf = await log_in(control, browser)
    before = await control.revision()
    for body, headers in (
            ("to=b", {}),  # no csrf field
            (f"to=b&csrf={'0' * 64}", {}),  # a wrong one
            (f"to=b&csrf={csrf}", {"Sec-Fetch-Site": "cross-site"}),
            (f"to=b&csrf={csrf}", {"Sec-Fetch-Site": "same-site"}),
            (f"to=b&csrf={csrf}", {"Origin": "http://evil.example"})):
        answer = await browser.post("/ui/vms/web/migrate", content=body,
                                         headers={**FORM, **headers})
        assert answer.status_code == 401, (body, headers)
        assert answer.json()["code"] == "unauthorized"
    browser.cookies.clear()
    answer = await browser.post("/ui/vms/web/migrate", content=f"to=b&csrf={csrf}",
                                     headers=FORM)
    assert answer.status_code == 401  # no session
    assert await control.revision() == before


async def test_an_action_is_the_apis_request(
        control: Control, browser: httpx.AsyncClient) -> None:
    await running_on_a(control)
    csrf = await log_in(control, browser)
    headers = {**FORM, "Origin": "http://control", "Sec-Fetch-Site": "same-origin",
               "Accept": "application/json"}
    answer = await browser.post("/ui/vms/web/migrate", content=f"to=a&csrf={csrf}",
                                     headers=headers)
    assert answer.status_code == 409 and "runs on a already" in answer.json()["detail"]
    answer = await browser.post("/ui/vms/web/migrate", content=f"to=b&csrf={csrf}",
                                     headers=headers)
    assert answer.status_code == 202 and answer.json()["detail"] == "migrate web to b: requested"
    vm = await control.fleet.vm("web")
    assert vm.value.desired.move is not None and vm.value.desired.move.to == "b"
    answer = await browser.post("/ui/nodes/b/drain", content=f"csrf={csrf}",
                                     headers={**FORM})  # a plain form: back to the page
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    assert (await control.fleet.store.get(Keys.drain("b"))) is not None
    answer = await browser.post("/ui/nodes/b/uncordon", content=f"csrf={csrf}",
                                headers=headers)
    assert answer.status_code == 200 and answer.json()["detail"] == "uncordon b: requested"
    assert (await control.fleet.store.get(Keys.drain("b"))) is None
    answer = await browser.post("/ui/vms/web/stop", content=f"csrf={csrf}", headers=headers)
    assert answer.status_code == 202
    assert not (await control.fleet.vm("web")).value.desired.running
    answer = await browser.post("/ui/vms/nope/start", content=f"csrf={csrf}", headers=headers)
    assert answer.status_code == 404 and answer.json()["code"] == "not_found"


async def test_logging_out_ends_the_session(
        control: Control, browser: httpx.AsyncClient) -> None:
    csrf = await log_in(control, browser)
    answer = await browser.post("/logout", content="csrf=wrong", headers=FORM)
    assert answer.status_code == 401  # a forged logout is refused too
    answer = await browser.post("/logout", content=f"csrf={csrf}", headers=FORM)
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert 'Max-Age=0' in answer.headers["set-cookie"]
    page = await browser.get("/")
    assert page.status_code == 303 and page.headers["location"] == "/login"


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300), path=st.sampled_from(
    ["/login", "/logout", "/ui/vms/web/migrate", "/ui/vms/web/stop", "/ui/nodes/a/drain",
     "/ui/vms/web/nope"]), kind=st.sampled_from(
    ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"]))
async def test_any_form_body_is_refused_cleanly_and_changes_nothing(
        control: Control, browser: httpx.AsyncClient, body: bytes, path: str, kind: str) -> None:
    before = await control.revision()
    answer = await browser.post(path, content=body, headers={"Content-Type": kind})
    assert answer.status_code in (400, 401, 404, 422), answer.text
    assert await control.revision() == before


async def test_the_board_folds_the_log_into_flights_history_and_evacuations(
        control: Control) -> None:
    await running_on_a(control)
    node_b = (await control.fleet.view()).node_view("b").registration.peer
    await control.fleet.event(ControlKind.DRAIN_STARTED, node="a")
    await control.fleet.event(ControlKind.MIGRATION_STARTED, vm="web", node="a", to="b")

    def migrating(r: VMRecord) -> VMRecord:
        r.status.phase, r.status.target = VMPhase.MIGRATING, "b"
        return r
    await control.fleet.update(Keys.vm("web"), VMRecord, migrating)
    await control.fleet.append(RelayedEvent(node="a", at=time.time(), event=ProgressEvent(
        vm="web", phase="cycle", cycle=2, bytes_sent=300 << 20, bytes_expected=400 << 20,
        dirty_rate=1e6)))
    board, _ = await Board.load(control.fleet)
    flight = board.flights["web"]
    assert flight.target == "b" and flight.fraction == 0.75 and flight.progress is not None
    await control.fleet.append(RelayedEvent(node="a", at=time.time(), event=OutcomeEvent(
        vm="web", to=node_b.removeprefix("tcp://"), outcome="completed", downtime_ms=42.0,
        bytes_sent=512 << 20, duration_ms=2000)))
    await control.fleet.event(ControlKind.MIGRATION_ENDED, vm="web", node="a", to="b")
    await control.fleet.event(ControlKind.DRAIN_FINISHED, node="a")
    board, _ = await Board.load(control.fleet)
    [done] = board.history
    assert (done.vm, done.source, done.target) == ("web", "a", "b")
    assert done.throughput == 256 << 20
    [drain] = board.evacuations
    assert drain.node == "a" and drain.finished is not None
    assert [(a.vm, a.ok) for a in drain.arrivals] == [("web", True)]
    assert plots.downtime(board.history).count("<circle") == 1
    assert plots.throughput(board.history).count("<rect") == 1
    assert plots.evacuation(drain).count("<rect") == 1
    assert "No completed migration" in plots.downtime([])


def test_ticks_are_round_and_cover_the_range() -> None:
    assert plots.ticks(95) == [0, 25, 50, 75, 100]
    assert plots.ticks(0.3)[-1] >= 0.3
    assert plots.ticks(0) == [0.0, 1.0]


@given(st.floats(min_value=1e-6, max_value=1e12))
def test_ticks_cover_any_value(high: float) -> None:
    found = plots.ticks(high)
    assert found[0] == 0 and found[-1] >= high * (1 - 1e-9) and len(found) <= 6


async def test_the_stream_sends_sections_as_they_change_and_ends_when_the_token_goes(
        control: Control) -> None:
    await running_on_a(control)
    sock = listen_socket("127.0.0.1", 0)
    server = peer_api.server(control.http._transport.app)  # type: ignore[attr-defined]
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(server.serve(sockets=[sock]))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                answer = await client.post("/login", content=f"token={control.token}",
                                           headers=FORM)
                assert answer.status_code == 303
                async with aconnect_sse(client, "GET", "/ui/stream") as source:
                    events = source.aiter_sse()
                    first = {(await anext(events)).event for _ in SECTIONS}
                    assert first == set(SECTIONS)  # the whole page at once

                    def cordon(record: NodeRecord) -> NodeRecord:
                        record.cordoned = True
                        return record
                    await control.fleet.update(Keys.node("b"), NodeRecord, cordon)
                    sent = {}
                    while "vms" not in sent:  # b takes no VM: no longer a destination
                        event = await anext(events)
                        sent[event.event] = event.data
                    assert set(sent) == {"summary", "nodes", "vms"}  # what changed, only
                    assert 'data-state="cordoned"' in sent["nodes"]
                    assert '<option value="b">' not in sent["vms"]
                    await control.store.delete(Keys.token(auth.digest(control.token)))
                    await control.fleet.update(Keys.node("a"), NodeRecord, cordon)
                    rest = [event async for event in events]
                    assert rest == []  # ended, with nothing of the change sent
                assert (await client.get("/ui/stream")).status_code == 401
        finally:
            server.should_exit = True
            await serving
