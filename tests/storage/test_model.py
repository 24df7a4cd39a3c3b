"""Random unaligned reads and writes through whole stacks agree with a bytearray."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roam.storage.cow import CopyOnWrite
from roam.storage.dirty import DirtyTracker
from roam.storage.metrics import Metrics
from roam.storage.provider import Provider
from roam.storage.sources import FileSource, MemorySource, SparseFileSource
from roam.storage.volatility import VolatilityMonitor

BS = 4096
SIZE = 6 * BS + 123
MODEL = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])

ranges = st.integers(0, SIZE).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(0, min(SIZE - off, 3 * BS)))
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), ranges, st.just(0)),
        st.tuples(st.just("write"), ranges, st.integers(0, 255)),
        st.tuples(st.just("track"), ranges, st.just(0)),
        st.tuples(st.just("flush"), st.just((0, 0)), st.just(0)),
    ),
    max_size=40,
)


def _pattern(seed: int, n: int) -> bytes:
    """Mostly distinct bytes; seed 0 gives zeroes (exercises hole punching)."""
    if seed == 0:
        return bytes(n)
    return bytes((seed + i * 7) & 0xFF for i in range(n))


async def _run(dev: Provider, model: bytearray, program: list[tuple[str, tuple[int, int], int]],
               tracker: DirtyTracker | None = None) -> set[int]:
    """Apply the program to the device and the model; return blocks expected dirty."""
    tracked: set[int] = set()
    dirty: set[int] = set()
    for op, (off, n), seed in program:
        blocks = set(range(off // BS, (off + n - 1) // BS + 1)) if n else set()
        if op == "read":
            assert bytes(await dev.read_at(off, n)) == bytes(model[off : off + n])
        elif op == "write":
            data = _pattern(seed, n)
            await dev.write_at(off, data)
            model[off : off + n] = data
            dirty |= blocks & tracked
        elif op == "track" and tracker is not None:
            assert bytes(await tracker.read_tracked(off, n)) == bytes(model[off : off + n])
            tracked |= blocks
        elif op == "flush":
            await dev.flush()
    assert bytes(await dev.read_at(0, SIZE)) == bytes(model)
    return dirty


@MODEL
@given(program=ops, kind=st.sampled_from(["memory", "file", "sparse"]))
def test_full_stack_matches_model(program: list[tuple[str, tuple[int, int], int]],
                                  kind: str) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            source: Provider
            if kind == "memory":
                source = MemorySource(SIZE)
            elif kind == "file":
                source = FileSource(Path(tmp) / "f", SIZE, create=True)
            else:
                source = SparseFileSource(Path(tmp) / "s", SIZE, block_size=BS)
            tracker = DirtyTracker(VolatilityMonitor(source, BS), BS)
            dev = Metrics(tracker)
            model = bytearray(SIZE)
            dirty = await _run(dev, model, program, tracker)
            assert set(tracker.sync()) == dirty
            writes = [p for p in program if p[0] == "write"]
            assert dev.stats.writes.ops == len(writes)
            assert dev.stats.writes.bytes == sum(n for _, (_, n), _ in writes)
            await dev.close()
            if kind != "memory":  # the bytes reached the file
                assert (Path(tmp) / ("f" if kind == "file" else "s")).read_bytes() == model

    asyncio.run(main())


@MODEL
@given(program=ops, reopen_at=st.integers(0, 40))
def test_overlay_matches_model(program: list[tuple[str, tuple[int, int], int]],
                               reopen_at: int) -> None:
    base_content = bytes((i * 31 + 7) & 0xFF for i in range(SIZE))

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "base").write_bytes(base_content)

            def open_overlay() -> CopyOnWrite:
                return CopyOnWrite(FileSource(d / "base", readonly=True),
                                  SparseFileSource(d / "upper", SIZE, block_size=BS),
                                  d / "map", BS)

            model = bytearray(base_content)
            ov = open_overlay()
            await _run(ov, model, program[:reopen_at])
            await ov.close()  # close and reopen half-way: the map must carry over
            ov = open_overlay()
            await _run(ov, model, program[reopen_at:])
            await ov.close()
            assert (d / "base").read_bytes() == base_content

    asyncio.run(main())
