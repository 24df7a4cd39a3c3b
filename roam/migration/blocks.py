"""Block encoding shared by both ends: hashing, zero detection, compression."""

from __future__ import annotations

import lz4.block
import xxhash
import zstandard

from roam.migration.wire import Encoding, ProtocolError
from roam.storage.provider import Buffer, is_zero

block_hash = xxhash.xxh3_128_digest


class Compressor:
    """Compresses blocks while it pays: after a run of incompressible blocks it only
    samples one block in `probe_every`, so random data costs almost nothing."""

    def __init__(self, encoding: Encoding, *, probe_every: int = 64) -> None:
        if encoding not in (Encoding.ZSTD, Encoding.LZ4):
            raise ValueError(f"{encoding.name} is not a compression")
        self.encoding = encoding
        self._zstd = zstandard.ZstdCompressor(level=1) if encoding == Encoding.ZSTD else None
        self._probe_every = probe_every
        self._misses = 0
        self._skip = 0

    def compress(self, data: Buffer) -> bytes | None:
        """The compressed block, or None when sending it raw is better."""
        if self._skip:
            self._skip -= 1
            return None
        if self._zstd is not None:
            out = self._zstd.compress(data)
        else:
            out = lz4.block.compress(data, store_size=False)
        if len(out) * 8 > len(data) * 7:  # saves under 12.5%: not worth the CPU
            self._misses += 1
            if self._misses >= 4:
                self._skip = self._probe_every
            return None
        self._misses = 0
        return bytes(out)


_zstd_d = zstandard.ZstdDecompressor()


def decompress(encoding: Encoding, data: Buffer, size: int) -> bytes:
    """Decode one block to exactly `size` bytes or raise ProtocolError."""
    try:
        if encoding == Encoding.ZSTD:
            out = _zstd_d.decompress(data, max_output_size=size)
        elif encoding == Encoding.LZ4:
            out = lz4.block.decompress(data, uncompressed_size=size)
        else:
            raise ProtocolError(f"{encoding.name} is not a compression")
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as e:
        raise ProtocolError(f"{encoding.name} block does not decompress: {e}") from None
    if len(out) != size:
        raise ProtocolError(f"{encoding.name} block decompressed to {len(out)} bytes, not {size}")
    return out


__all__ = ["Compressor", "block_hash", "decompress", "is_zero"]
