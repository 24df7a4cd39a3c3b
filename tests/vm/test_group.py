"""The VM device group: names, block sizes, package files and the authority payload."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roam.hypervisor import device_state
from roam.storage.sources import MemorySource
from roam.vm import group
from roam.vm.group import Authority, Device, GroupError, VMSpec
from roam.vm.package import HypervisorRef, PackageConfig
from tests.vm.test_package import fake_package


def test_order_and_block_sizes() -> None:
    """The static devices go first (a destination starts its machine from them while
    memory streams); memory is tracked per guest page, everything else per 64 KiB."""
    assert group.ORDER[:3] == group.STATIC
    assert set(group.ORDER) == set(Device)
    assert group.block_size(Device.MEMORY) == 4096
    assert {group.block_size(d) for d in Device if d != Device.MEMORY} == {64 << 10}
    with pytest.raises(GroupError, match="unknown device 'swap'"):
        group.device("swap")


def test_package_files_and_driver(tmp_path: Path) -> None:
    """One mapping from devices to package files; a package made before drivers were
    recorded loads as QEMU's, with the version it recorded."""
    package = fake_package(tmp_path / "pkg")
    assert group.package_files(package.config) == {
        Device.KERNEL: "vmlinuz", Device.INITRAMFS: "initramfs.img",
        Device.STATE: "state.img", Device.MEMORY: "memory.img", Device.DISK: "disk.img"}
    assert package.config.hypervisor is None
    assert package.config.driver() == HypervisorRef(name="qemu", version="7.2")
    no_initramfs = package.config.model_copy(update={"files": package.config.files.model_copy(
        update={"initramfs": None})})
    assert Device.INITRAMFS not in group.package_files(no_initramfs)
    assert set(group.device_sizes(package)) == set(group.WRITTEN)


def test_spec_device_round_trip(tmp_path: Path) -> None:
    config: PackageConfig = fake_package(tmp_path / "pkg").config
    spec = VMSpec(name="web", config=config, publish=["8080:80"])
    data = spec.device_bytes()
    assert len(data) == group.SPEC_SIZE
    assert VMSpec.from_device(data) == spec
    with pytest.raises(GroupError, match="not a VM spec"):
        VMSpec.from_device(b'{"name": 3}'.ljust(group.SPEC_SIZE, b"\0"))


async def test_authority_carries_the_device_state_once() -> None:
    """The payload holds the header and the saved state with its prefix; written into a
    destination's state device, that device then holds the same state."""
    source_state = MemorySource(1 << 20)
    reader = _reader(b"device state bytes" * 100)
    length = await device_state.write_state(source_state, reader)
    payload = await group.write_authority(Authority(live=True, stop_wall=12.5), source_state)
    handover = group.read_authority(payload)
    assert handover.authority == Authority(live=True, stop_wall=12.5)
    assert len(handover.state) == device_state.HEADER_SIZE + length
    destination_state = MemorySource(1 << 20)
    await group.store_state(handover, destination_state)
    assert await device_state.state_length(destination_state) == length
    chunks = [c async for c in device_state.read_state(destination_state)]
    assert b"".join(chunks) == b"device state bytes" * 100
    registry = group.read_authority(await group.write_authority(Authority(live=False), None))
    assert not registry.authority.live and registry.state == b""


@given(st.binary(max_size=512))
def test_authority_parser_refuses_garbage(payload: bytes) -> None:
    """Network input: anything that is not a version-1 payload is a GroupError."""
    try:
        handover = group.read_authority(payload)
    except GroupError:
        return
    head = json.loads(payload.partition(b"\0")[0])
    assert head.get("version", 1) == 1 and isinstance(handover.authority.live, bool)


@given(st.dictionaries(st.sampled_from(["version", "live", "stop_wall", "memory_blake3",
                                        "other"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=8))))
def test_authority_parser_fields(fields: dict[str, object]) -> None:
    """Whatever a header holds, the parser either refuses it or gives an Authority that
    survives a round trip: no field is taken in a form it would not write itself."""
    payload = json.dumps(fields).encode() + b"\0"
    try:
        handover = group.read_authority(payload)
    except GroupError:
        assert not (set(fields) <= {"version", "live", "stop_wall", "memory_blake3"}
                    and fields.get("version", 1) == 1 and isinstance(fields.get("live"), bool)
                    and fields.get("stop_wall") is None and fields.get("memory_blake3") is None)
        return
    assert isinstance(handover.authority.live, bool) and "other" not in fields
    again = group.read_authority(handover.authority.model_dump_json().encode() + b"\0")
    assert again.authority == handover.authority


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader
