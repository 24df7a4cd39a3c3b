"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against a
real fleet: `roam control serve` on host P and `roam node join` on A and B, in network
namespaces, one redis VM on A (the cheaper).

The browser logs in with a token, sees both nodes, migrates the VM to B from the page
(confirming in the dialog), watches its progress bar fill from the nodes' progress
events and the VM's row change node, sees the migration's downtime in the history and
the plot, then drains B from the page and sees the VM come back and the evacuation drawn.
Screenshots of each step are saved in the test's tmp directory.

The browser runs inside P's namespace (Playwright's driver and chromium are started from
a thread that entered it), where the control plane listens: nothing leaves the lab.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from roam.control import auth
from roam.control.client import ControlClient
from roam.control.fleet import Fleet as ControlFleet
from roam.control.models import NodeView, VMPhase, VMSpec
from roam.control.sqlite import SqliteStore
from roam.errors import RoamError
from roam.network import ns
from roam.network.lab import lab
from tests.blueprint.boot import short_dir
from tests.control.test_fleet import CONTROL, PEER_PORT, PORT, Fleet
from tests.vm.conftest import run_dir, snapshot

__all__ = ["run_dir", "snapshot"]

NODES = {"a": ("0.011", "aws", "eu-west-1"), "b": ("0.024", "gcp", "europe-west4")}
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000
T = TypeVar("T")


class TwoNodes(Fleet):
    """test_fleet's processes, with two nodes and no overlay; the test's own reads and
    writes go to the API with its client, from P's namespace (the CLI is not under test
    here, and a process per request is slow on a busy machine)."""

    def join(self, role: str, *labels: str, extra: tuple[str, ...] = ()) -> None:
        state = self.work / role
        state.mkdir()
        self.nodes[role] = self._in(
            role, sys.executable, "-m", "roam.cli.main", "node", "join", "--control",
            self.url, "--name", role, "--state-dir", str(state), "--listen",
            f"tcp://{self.hosts.addrs[role]}:{PEER_PORT}",
            *(f"--label={label}" for label in labels), *extra,
            stdout=(self.work / f"{role}.log").open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "ROAM_TOKEN": self.token})

    def api(self, use: Callable[[ControlClient], Awaitable[T]]) -> T:
        async def call() -> T:
            async with ControlClient(self.url, self.token) as client:
                return await use(client)
        return ns.call_in(self.hosts.nodes[CONTROL], lambda: asyncio.run(call()))

    def until(self, use: Callable[[ControlClient], Awaitable[bool]], what: str) -> None:
        async def ready(client: ControlClient) -> bool:
            deadline = time.monotonic() + WAIT_MS / 1000
            while time.monotonic() < deadline:
                try:
                    if await use(client):
                        return True
                except RoamError:
                    pass  # not serving yet (NOT_FOUND), or not yet as asked
                await asyncio.sleep(0.2)
            return False
        if not self.api(ready):
            pytest.fail(f"waited {WAIT_MS / 1000:.0f} s for {what}")


async def _token(data: Path) -> str:
    store = await SqliteStore.open(data)
    try:
        return await auth.create(ControlFleet(store), "browser test")
    finally:
        await store.close()


@pytest.fixture
def fleet(snapshot: Path) -> Iterator[TwoNodes]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}")
    with short_dir() as work, lab(CONTROL, *NODES, net="198.18.9") as hosts:
        the_fleet = TwoNodes(work, hosts)
        try:
            the_fleet.token = asyncio.run(_token(the_fleet.data))
            log = (work / "control.log").open("w")
            the_fleet.control = the_fleet._in(
                CONTROL, sys.executable, "-m", "roam.cli.main", "control", "serve", "--data",
                str(the_fleet.data), "--listen", f"{hosts.addrs[CONTROL]}:{PORT}",
                "--node-ttl", "4", stdout=log, stderr=subprocess.STDOUT)
            for role, (price, cloud, region) in NODES.items():
                the_fleet.join(role, f"price={price}", "lifecycle=spot", f"cloud={cloud}",
                               f"region={region}")
            the_fleet.until(lambda c: _count(c.nodes(), 2), "two nodes")
            spec = VMSpec(name="web", package=str(snapshot), memory_mib=256,
                          publish=["16379:6379"])
            the_fleet.api(lambda c: c.create(spec))
            the_fleet.until(lambda c: _on(c, "web", "a"), "web running on a")
            yield the_fleet
        finally:
            the_fleet.close()


async def _count(nodes: Awaitable[list[NodeView]], count: int) -> bool:
    return len(await nodes) == count


async def _on(client: ControlClient, vm: str, node: str) -> bool:
    status = (await client.vm(vm)).status
    return status.phase == VMPhase.RUNNING and status.node == node


RECORD_PROGRESS = """() => {
  window.progressSeen = [];
  const record = () => {
    for (const bar of document.querySelectorAll('#migrations .progress')) {
      window.progressSeen.push(Number(bar.getAttribute('aria-valuenow')));
    }
  };
  new MutationObserver(record).observe(document.getElementById('migrations'),
                                       {childList: true, subtree: true});
}"""


def confirm(page: Page, shot: Path | None = None) -> None:
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    if shot is not None:
        page.screenshot(path=shot)
    dialog.locator("#confirm-ok").click()
    expect(dialog).to_be_hidden()


def scenario(fleet: TwoNodes, out: Path) -> dict[str, Any]:
    errors: list[str] = []
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(out / "profile"), executable_path=CHROMIUM, args=ARGS, headless=True,
            viewport={"width": 1440, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            page.goto(fleet.url + "/")
            assert page.url.endswith("/login")  # no session: the login form
            page.fill("#token", "roam_not-a-token")
            page.click("button[type=submit]")
            expect(page.locator("p.error")).to_contain_text("not valid")
            errors.clear()  # the browser logs the 401 of that refused login
            page.screenshot(path=out / "1-login-refused.png")
            page.fill("#token", fleet.token)
            page.click("button[type=submit]")
            page.wait_for_url(fleet.url + "/")
            for node in NODES:
                expect(page.locator(f'tr[data-node="{node}"] [data-state]')).to_have_text(
                    "ready")
            vm = page.locator('tr[data-vm="web"]')
            expect(vm.locator(".vm-node")).to_have_text("a")
            expect(vm.locator("[data-phase]")).to_have_text("running")
            expect(page.locator("#live")).to_have_attribute("data-state", "live")
            page.screenshot(path=out / "2-fleet.png", full_page=True)

            page.evaluate(RECORD_PROGRESS)
            vm.locator("select[name=to]").select_option("b")
            vm.locator("button", has_text="Migrate").click()
            expect(page.locator("#confirm-text")).to_have_text(
                "Live-migrate web from a to b?")
            confirm(page, out / "3-confirm.png")
            flight = page.locator('.flight[data-flight="web"]')
            expect(flight.locator(".progress")).to_be_visible()
            page.screenshot(path=out / "4-started.png", full_page=True)
            page.wait_for_function("() => window.progressSeen.some(v => v > 0)")
            page.screenshot(path=out / "5-progress.png", full_page=True)
            expect(vm.locator(".vm-node")).to_have_text("b")
            expect(vm.locator("[data-phase]")).to_have_text("running")
            downtime = page.locator('tr[data-history="web"] .downtime').first
            expect(downtime).to_contain_text(" ms")
            expect(page.locator('svg[aria-label="downtime per migration over time"] '
                                'circle')).to_have_count(1)
            page.screenshot(path=out / "6-migrated.png", full_page=True)
            progress = page.evaluate("() => window.progressSeen")

            page.locator('tr[data-node="b"] button', has_text="Drain").click()
            confirm(page)
            expect(page.locator('tr[data-node="b"] [data-state]')).to_have_text("cordoned")
            expect(vm.locator(".vm-node")).to_have_text("a")
            evacuation = page.locator('svg[aria-label="evacuation of b"]')
            expect(evacuation.locator("rect.bar")).to_have_count(1)
            expect(page.locator('svg[aria-label="downtime per migration over time"] '
                                'circle')).to_have_count(2)
            page.screenshot(path=out / "7-drained.png", full_page=True)
            return {"progress": progress, "downtime": downtime.inner_text(),
                    "errors": errors}
        finally:
            context.close()


@pytest.mark.timeout(300)
def test_a_migration_and_a_drain_from_the_page(fleet: TwoNodes, tmp_path: Path) -> None:
    seen = ns.call_in(fleet.hosts.nodes[CONTROL], lambda: scenario(fleet, tmp_path))
    print(f"\nprogress seen {seen['progress']}, downtime {seen['downtime']}; "
          f"screenshots in {tmp_path}")
    assert any(0 < value for value in seen["progress"])
    assert not seen["errors"], seen["errors"]
    status = fleet.api(lambda c: c.vm("web")).status
    assert status.node == "a" and status.epoch == 3  # placed, moved to b and back
