"""Per-block work done on whole arrays: runs of set bits, zero blocks in a buffer.

Migration and the storage stacks keep one flag or counter per block; with 4 KiB memory
pages a 16 GiB guest has four million of them. A Python loop per block costs about a
microsecond, which is longer than moving the block (loopback TCP moves 4 KiB in about
one), so every per-block pass here is one numpy call over the whole range instead.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from roam.storage.provider import Buffer, is_zero

Mask = npt.NDArray[np.bool_]
Blocks = npt.NDArray[np.int64]


def runs(mask: Mask) -> list[tuple[int, int]]:
    """(start, length) of each run of True in `mask`, in order."""
    if not len(mask):
        return []
    edges = np.flatnonzero(np.diff(mask.view(np.int8), prepend=0, append=0))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def block_runs(blocks: Blocks) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in a sorted block array."""
    if not len(blocks):
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(blocks)]))
    return [(int(blocks[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def zero_blocks(data: Buffer, block_size: int) -> Mask:
    """Which blocks of `data` are all zero (the last one may be short).

    A block whose first 8 bytes are not zero is not zero: for data that is not mostly
    zero that settles almost every block with one read of a word, and only the other
    blocks are scanned whole.
    """
    view = memoryview(data).cast("B")
    full = len(view) // block_size
    nblocks = full + (1 if len(view) % block_size else 0)
    zero = np.zeros(nblocks, dtype=np.bool_)
    if full:
        words = np.frombuffer(view[: full * block_size], dtype=np.uint64).reshape(
            full, block_size // 8)
        candidates = np.flatnonzero(words[:, 0] == 0)
        if len(candidates) == full:  # mostly zero: scan in place, no copy of the rows
            zero[:full] = words.max(axis=1) == 0
        elif len(candidates):
            zero[candidates] = words[candidates].max(axis=1) == 0
    if nblocks > full:
        zero[full] = is_zero(view[full * block_size :])
    return zero
