"""Hypothesis fuzzing of a standby mirror's end (roam.peer.mirrored.Standby): whatever
a mirror source sends after a valid GROUP, the standby ends (its worker would exit)
with the connection closed and an error recorded, never with another exception, and
never writes beyond its devices' sizes or outside its directory."""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
from pathlib import Path

import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.migration import wire as w
from roam.migration.channel import FrameProtocol
from roam.peer import mirrored
from roam.peer.mirrored import Standby

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BS = 4096
SIZES = {"memory": 3 * BS + 100, "disk": 2 * BS}
GROUP = w.Group(name="fz", devices=[
    w.DeviceSpec(id=i, name=name, size=size, block_size=BS)
    for i, (name, size) in enumerate(SIZES.items())])
STATUS = w.encode_event(w.EventKind.MIRRORED, b'{"lag_bytes": 0, "epoch": 0}')


def raw(device: int, first: int, count: int, carried: bytes, payload: bytes) -> bytes:
    return w.encode_raw_header(device, first, count, carried,
                               xxhash.xxh3_128_digest(payload), len(payload)) + payload


frames = st.one_of(
    st.binary(max_size=64).map(lambda b: w.frame(w.MsgType.BLOCKS, len(b)) + b),
    st.builds(raw, st.integers(0, 3), st.integers(0, 6), st.integers(1, 4),
              st.sampled_from([b"\x01", b"\x03", b"\x0f"]),
              st.binary(min_size=0, max_size=3 * BS).filter(lambda b: len(b) % 512 == 0)),
    st.builds(lambda d, f, c: w.encode_blocks_header(d, w.Encoding.ZERO, f, c, b"", [], 0),
              st.integers(0, 3), st.integers(0, 6), st.integers(1, 4)),
    st.builds(lambda k, p: w.encode_event(k, p), st.sampled_from(list(w.EventKind)),
              st.binary(max_size=80)),
    st.just(w.encode_event(w.EventKind.CHECKPOINT,
                           b'{"seq": 1, "epoch": 0, "at": 1.0, "pause_ms": 1.0}')),
    st.binary(min_size=8, max_size=40).map(
        lambda b: struct.pack("!BBHI", b[0], 0, 0, len(b) - 8) + b[8:]),
)


async def _pair() -> tuple[FrameProtocol, FrameProtocol]:
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    pa, pb = FrameProtocol(), FrameProtocol()
    await loop.create_unix_connection(lambda: pa, sock=a)
    await loop.create_unix_connection(lambda: pb, sock=b)
    return pa, pb


@FUZZ
@given(sent=st.lists(frames, max_size=6))
def test_standby_survives_any_source(sent: list[bytes]) -> None:
    async def main(root: Path) -> Standby:
        source, standby_end = await _pair()
        standby = Standby(standby_end, root / "vms" / "1", root / "mirrors", None)
        (root / "vms" / "1").mkdir(parents=True)
        source.send(w.encode_group(GROUP))
        source.send(STATUS)
        for frame in sent:
            source.send(frame)
        await source.drain()
        running = asyncio.create_task(standby.run())
        await asyncio.sleep(0.05)
        await source.close()  # the source is gone: the standby ends
        async with asyncio.timeout(10):
            await running
        return standby

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        standby = asyncio.run(main(root))
        live = root / "mirrors" / "fz" / mirrored.LIVE
        assert sorted(p.name for p in live.iterdir()) == ["disk.img", "memory.img"]
        for name, size in SIZES.items():
            assert (live / f"{name}.img").stat().st_size == size
        assert standby.state == "stopped"
        assert not (root / "mirrors" / "fz" / mirrored.CHECKPOINT).exists()  # no vm.json


def test_an_older_epoch_is_refused_before_any_file(tmp_path: Path) -> None:
    """A standby that ran the VM under epoch 1 refuses a mirror of epoch 0 at once."""
    directory = tmp_path / "mirrors" / "fz"
    directory.mkdir(parents=True)
    (directory / mirrored.AUTHORITY).write_text('{"epoch": 1, "seq": 3, "at": 1.0}')

    async def main() -> bytes:
        source, standby_end = await _pair()
        source.send(w.encode_group(GROUP))
        source.send(STATUS)
        await source.drain()
        async with asyncio.timeout(10):
            await Standby(standby_end, tmp_path, tmp_path / "mirrors", None).run()
            kind, body = await source.recv()
        assert kind == w.MsgType.ERROR
        return bytes(body)

    error = asyncio.run(main())
    assert b"epoch 0 must not run" in error
    assert not (directory / mirrored.LIVE).exists()
