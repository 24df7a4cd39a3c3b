"""`roam spot fake-metadata` and `roam spot watch` as users run them: two processes, a
notice given over HTTP, one JSON line per notice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest

ROAM = [sys.executable, "-m", "roam.cli.main"]


@pytest.mark.parametrize("cloud", ["aws", "azure"])  # GCP's watcher: test_watcher.py
def test_watch_prints_the_notice_the_fake_gives(cloud: str) -> None:
    fake = subprocess.Popen([*ROAM, "spot", "fake-metadata", "--listen", "127.0.0.1:0",
                             "--cloud", cloud, "--json"], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        url = json.loads(fake.stdout.readline())["url"]
        watch = subprocess.Popen([*ROAM, "spot", "watch", "--cloud", cloud, "--metadata", url,
                                  "--interval", "0.05", "--count", "1", "--json",
                                  "--acknowledge"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with httpx.Client(base_url=url, trust_env=False) as http:
                for _ in range(500):  # until the watcher has asked at least twice
                    if sum(http.get("/_roam/state").json()["requests"].values()) >= 2:
                        break
                given = http.post("/_roam/notice", json={"deadline_seconds": 45}).json()
                out, err = watch.communicate(timeout=60)
                state = http.get("/_roam/state").json()
        finally:
            watch.kill()
        assert watch.returncode == 0, err
        [line] = out.splitlines()
        notice = json.loads(line)
        assert notice["cloud"] == cloud
        assert notice["action"] == ("terminate" if cloud == "aws" else "preempt")
        if cloud != "gcp":
            assert notice["deadline"].replace("Z", "+00:00") == given["notice"]["deadline"]
        assert state["acknowledged"] == ([given["notice"]["event_id"]] if cloud == "azure"
                                         else [])
        assert "spot notice" in err  # and the log says so
    finally:
        fake.send_signal(signal.SIGTERM)
        assert fake.wait(timeout=10) == 0


@pytest.mark.parametrize(("args", "message"), [
    (["watch", "--cloud", "ibm"], "ibm"),
    (["watch", "--cloud", "aws", "--metadata", "https://169.254.169.254/x"], "--metadata"),
    (["fake-metadata", "--listen", "0.0.0.0:80"], "neither loopback nor link-local"),
    (["fake-metadata", "--listen", "localhost"], "--listen"),
])
def test_bad_options_are_one_line_usage_errors(args: list[str], message: str) -> None:
    done = subprocess.run([*ROAM, "spot", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
