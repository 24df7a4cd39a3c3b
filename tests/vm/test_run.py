"""Snapshots resumed by `roam run`: exec, suspend and resume, packages, a killed QEMU."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import xxhash

from roam.network import ns
from roam.network.leases import Leases
from roam.vm import control
from tests.vm.conftest import RUN_TIMEOUT, RunningVM, roam

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COUNTER = ("setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/counter; "
           "sleep 0.1; done' </dev/null >/dev/null 2>&1 &")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def guest_clock(vm: RunningVM) -> tuple[str, float, int]:
    """(boot id, uptime, counter) read in one exec."""
    out = vm.sh("cat /proc/sys/kernel/random/boot_id; cut -d' ' -f1 /proc/uptime; "
                "cat /run/counter").split()
    return out[0], float(out[1]), int(out[2])


def test_exec_ls_and_exit_codes(package: Path) -> None:
    vm = RunningVM(package, "execvm", "--json")
    try:
        done = roam("exec", "execvm", "redis-cli", "ping")
        assert done.stdout == "PONG\n"
        assert roam("exec", "execvm", "--", "redis-cli", "ping").stdout == "PONG\n"  # as before
        failed = roam("exec", "execvm", "sh", "-c", "echo oops >&2; exit 3", check=False)
        assert (failed.returncode, failed.stderr) == (3, "oops\n")
        slow = roam("exec", "--timeout", "1", "execvm", "sleep", "10", check=False)
        assert slow.returncode == 124 and slow.stderr.startswith("error: sleep 10 timed out")
        listing = roam("ls").stdout
        assert "execvm" in listing and "256 MiB" in listing
        listed = json.loads(roam("ls", "--json").stdout)
        assert [(v["name"], v["memory_mib"]) for v in listed] == [("execvm", 256)]
        assert listed[0]["uptime_s"] >= 0
        # `roam logs` of a `roam run` VM: its run directory's console.
        roam("exec", "execvm", "sh", "-c", "echo run-log-marker > /dev/ttyS0")
        deadline = time.monotonic() + 30
        while "run-log-marker" not in roam("logs", "execvm").stdout:
            assert time.monotonic() < deadline, "the console line never reached the log"
            time.sleep(0.2)
        missing = roam("exec", "nosuchvm", "--", "true", check=False)
        assert missing.returncode == 1 and "no VM called 'nosuchvm'" in missing.stderr
    finally:
        vm.process.send_signal(signal.SIGTERM)
        out, err = vm.process.communicate(timeout=RUN_TIMEOUT)
    assert vm.process.returncode == 0, err
    running, suspended = (json.loads(line) for line in out.splitlines())
    assert (running["event"], running["name"], running["memory_mib"]) == ("running", "execvm", 256)
    assert suspended["event"] == "suspended" and suspended["committed_bytes"] > 0


def test_run_stop_run_continues_without_reboot(package: Path) -> None:
    vm = RunningVM(package, "contvm")
    assert vm.sh("redis-cli set greeting hello") == "OK\n"
    vm.sh(COUNTER)
    time.sleep(1)
    boot_id, uptime, counter = guest_clock(vm)
    assert counter > 0
    stderr = vm.stop()
    assert "package updated" in stderr

    port = free_port()
    time.sleep(1)  # host time passes; the guest's uptime must not jump by it or restart
    vm = RunningVM(package, "contvm", "--publish", f"{port}:6379")
    try:
        again_id, again_uptime, again_counter = guest_clock(vm)
        assert again_id == boot_id  # not rebooted
        assert uptime <= again_uptime < uptime + 30
        assert again_counter >= counter
        time.sleep(0.5)
        assert guest_clock(vm)[2] > again_counter  # the loop runs on
        assert vm.sh("redis-cli get greeting") == "hello\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET greeting\r\n")
            assert conn.recv(100) == b"$5\r\nhello\r\n"
    finally:
        vm.stop()


def file_hashes(package: Path) -> dict[str, str]:
    return {p.name: xxhash.xxh3_128(p.read_bytes()).hexdigest()
            for p in sorted(package.iterdir())}


def test_qemu_killed_leaves_the_package_unchanged(package: Path) -> None:
    before = file_hashes(package)
    vm = RunningVM(package, "killvm")
    vm.sh("redis-cli set lost yes; sync")
    os.kill(int(vm.info["qemu_pid"]), signal.SIGKILL)
    _, stderr = vm.process.communicate(timeout=60)
    assert vm.process.returncode == 1
    assert "QEMU exited unexpectedly (killed by signal 9)" in stderr
    assert "the package is unchanged" in stderr
    assert file_hashes(package) == before
    with pytest.raises(control.ControlError):
        asyncio.run(control.call("killvm", "info"))
    vm = RunningVM(package, "killvm")  # and it still resumes from the snapshot
    try:
        assert vm.sh("redis-cli get lost") == "\n"
    finally:
        vm.stop()


def test_package_create_extract_run(snapshot: Path, tmp_path: Path) -> None:
    archive = tmp_path / "pkg.tar.zst"
    roam("package", "create", str(snapshot), str(archive))
    roam("package", "extract", str(archive), str(tmp_path / "out"))
    memory = tmp_path / "out" / "memory.img"
    assert memory.stat().st_blocks * 512 < memory.stat().st_size  # still sparse
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["memory_mib"] == 256
    vm = RunningVM(tmp_path / "out", "extracted")
    try:
        assert vm.sh("redis-cli ping") == "PONG\n"
    finally:
        vm.stop()

    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x55
    corrupt = tmp_path / "corrupt.tar.zst"
    corrupt.write_bytes(data)
    refused = roam("package", "extract", str(corrupt), str(tmp_path / "bad"), check=False)
    assert refused.returncode == 1 and "corrupt package" in refused.stderr
    assert not (tmp_path / "bad").exists()  # made for the archive, removed with it


def process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie nobody reaps is gone all the same


def test_killed_runner_takes_qemu_along(package: Path) -> None:
    before = file_hashes(package)
    vm = RunningVM(package, "orphan")
    vm.process.kill()
    vm.process.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while not process_gone(int(vm.info["qemu_pid"])):
        assert time.monotonic() < deadline, "QEMU outlived roam run"
        time.sleep(0.1)
    assert file_hashes(package) == before
    assert ns.exists("roam-orphan")  # the dead run's network, until the next start sweeps it
    vm = RunningVM(package, "orphan")  # over the dead run's leftover FUSE mount and network
    try:
        assert vm.sh("redis-cli ping") == "PONG\n"
    finally:
        vm.stop()
    assert not ns.exists("roam-orphan") and Leases().get("orphan") is None
