"""The driver interface, proved through the one driver there is (QEMU): a machine boots on
engine devices, saves its device state, and a second machine on the same devices resumes
it; the factory refuses drivers this build does not have."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roam import hypervisor
from roam.blueprint import Blueprint
from roam.errors import ErrorCode
from roam.hypervisor import MachineExited, MachineSpec, Nic, UnknownDriver
from roam.storage.cow import CopyOnWrite
from roam.storage.sources import MemorySource, SparseFileSource
from roam.vm.lifecycle import VM
from tests.blueprint.boot import short_dir

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse"),
]

MEMORY_MIB = 256
BOOT_ID = "/proc/sys/kernel/random/boot_id"


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir() as path:  # UNIX socket paths must stay short
        yield path


def test_factory() -> None:
    qemu = hypervisor.driver("qemu")
    assert qemu.name == "qemu" and qemu.capabilities.incoming_state
    assert qemu.version()[0].isdigit()
    with pytest.raises(UnknownDriver, match="no hypervisor driver 'firecracker'") as raised:
        hypervisor.driver("firecracker")
    assert raised.value.code == ErrorCode.BAD_REQUEST


async def test_save_on_one_machine_resume_on_another(blueprint: Blueprint, workdir: Path,
                                                     tmp_path: Path) -> None:
    """The contract migration is built on: memory is the Provider itself, device state
    alone goes through save_state/load_state, and the guest goes on where it was."""
    driver = hypervisor.driver("qemu")
    spec = MachineSpec(kernel=blueprint.kernel, initramfs=blueprint.initramfs,
                       cmdline=blueprint.cmdline, memory_mib=MEMORY_MIB, cpus=1,
                       machine="q35", cpu_model="max", accel="tcg", mac="52:54:00:00:00:09")
    size = blueprint.rootfs.stat().st_size
    disk = CopyOnWrite(SparseFileSource(blueprint.rootfs, size, create=False),
                       SparseFileSource(tmp_path / "disk.upper", size), tmp_path / "disk.map",
                       64 << 10)
    memory = MemorySource(MEMORY_MIB << 20)
    state = MemorySource(16 << 20)
    first = workdir / "first"
    first.mkdir()
    async with driver.machine(spec, first, memory, disk) as machine:
        vm = VM(machine)
        await vm.boot(Nic.detached(), ready_timeout=300)
        result = await vm.exec(["sh", "-c", f"echo kept > /run/token; cat {BOOT_ID}"], 30)
        boot_id = result.stdout
        # pause and resume say when QEMU stopped and ran the guest (its events' clock).
        before = time.time()
        stopped = await machine.pause()
        ran = await machine.resume()
        assert before - 1 <= stopped <= ran <= time.time() + 1
        assert await vm.suspend(state) > 0
        await vm.close()
    second = workdir / "second"
    second.mkdir()
    async with driver.machine(spec, second, memory, disk) as machine:
        vm = VM(machine)
        resumed = await vm.resume(state, Nic.detached())
        assert resumed.load_state_ms > 0
        result = await vm.exec(["sh", "-c", f"cat /run/token {BOOT_ID}"], 30)
        assert result.stdout == "kept\n" + boot_id  # same boot, same tmpfs content
        pid = machine.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        exited = await machine.wait_exit()
        assert isinstance(exited, MachineExited) and exited.returncode == -signal.SIGKILL
        with pytest.raises(MachineExited):  # what waits on a dead machine is not left hanging
            await machine.guard(asyncio.sleep(60))
        await vm.close()
    await disk.close()
