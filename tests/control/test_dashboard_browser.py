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

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from roam.network import ns
from roam.network.lab import lab
from tests.blueprint.boot import short_dir
from tests.control.test_fleet import CONTROL, PEER_PORT, Fleet
from tests.vm.conftest import run_dir, snapshot

__all__ = ["run_dir", "snapshot"]

NODES = {"a": ("0.011", "aws", "eu-west-1"), "b": ("0.024", "gcp", "europe-west4")}
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000


class TwoNodes(Fleet):
    """test_fleet's processes, with two nodes and no overlay."""

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


@pytest.fixture
def fleet(snapshot: Path) -> Iterator[TwoNodes]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}")
    with short_dir() as work, lab(CONTROL, *NODES, net="198.18.9") as hosts:
        the_fleet = TwoNodes(work, hosts)
        try:
            done = subprocess.run([sys.executable, "-m", "roam.cli.main", "control", "token",
                                   "create", "--data", str(the_fleet.data), "--name", "web"],
                                  capture_output=True, text=True, check=True)
            the_fleet.token = done.stdout.strip()
            the_fleet.start_control()
            for role, (price, cloud, region) in NODES.items():
                the_fleet.join(role, f"price={price}", "lifecycle=spot", f"cloud={cloud}",
                               f"region={region}")
            the_fleet.wait(lambda: len(the_fleet.nodes_by_name()) == 2, "two nodes")
            created = the_fleet.roam("vm", "create", "web", "--package", str(snapshot),
                                     "--publish", "16379:6379")
            assert created["status"]["node"] == "a"
            yield the_fleet
        finally:
            the_fleet.close()


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
            page.wait_for_function("() => window.progressSeen.some(v => v > 0)")
            page.screenshot(path=out / "4-migrating.png", full_page=True)
            expect(vm.locator(".vm-node")).to_have_text("b")
            expect(vm.locator("[data-phase]")).to_have_text("running")
            downtime = page.locator('tr[data-history="web"] .downtime').first
            expect(downtime).to_contain_text(" ms")
            expect(page.locator('svg[aria-label="downtime per migration over time"] '
                                'circle')).to_have_count(1)
            page.screenshot(path=out / "5-migrated.png", full_page=True)
            progress = page.evaluate("() => window.progressSeen")

            page.locator('tr[data-node="b"] button', has_text="Drain").click()
            confirm(page)
            expect(page.locator('tr[data-node="b"] [data-state]')).to_have_text("cordoned")
            expect(vm.locator(".vm-node")).to_have_text("a")
            evacuation = page.locator('svg[aria-label="evacuation of b"]')
            expect(evacuation.locator("rect.bar")).to_have_count(1)
            expect(page.locator('svg[aria-label="downtime per migration over time"] '
                                'circle')).to_have_count(2)
            page.screenshot(path=out / "6-drained.png", full_page=True)
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
    vms = fleet.vms()
    assert vms["web"]["status"]["node"] == "a" and vms["web"]["status"]["epoch"] == 3
