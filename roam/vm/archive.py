"""Package archives: a package directory as tar + zstd, checked when extracted.

The archive is an ordinary tar (readable by `tar --zstd -x`) whose last member,
MANIFEST.json, gives each file's size and xxh3_128. Extraction hashes every file as it
writes it and refuses the archive (removing what it wrote) if a file is missing, extra,
of another size or hash, or if zstd's own frame checksum fails. Runs of zero blocks are
not written on extraction, so memory and disk images stay sparse.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import xxhash
import zstandard

from roam.vm.package import CONFIG, Package, PackageError

MANIFEST = "MANIFEST.json"
CHUNK = 1 << 20
ZERO_BLOCK = 64 * 1024
_ZEROES = bytes(ZERO_BLOCK)
ZSTD_LEVEL = 3

Progress = Callable[[int], None]
"""Called with a byte count as work advances (file bytes on create, archive bytes on
extract)."""


class _HashingReader:
    """The file object tarfile copies from: hashes and reports what passes through."""

    def __init__(self, file: IO[bytes], progress: Progress | None) -> None:
        self._file = file
        self._progress = progress
        self.hash = xxhash.xxh3_128()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.hash.update(data)
        if self._progress is not None:
            self._progress(len(data))
        return data


def package_files(directory: Path) -> list[str]:
    """The files an archive of `directory` holds, config first so readers see it early."""
    package = Package.load(directory)
    return [CONFIG, *package.config.files.names()]


def create(directory: Path, archive: Path, progress: Progress | None = None,
           threads: int = 0) -> None:
    """Archive the package at `directory` into `archive` (tar + zstd, with a manifest)."""
    names = package_files(directory)
    manifest: dict[str, dict[str, Any]] = {}
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True,
                                          threads=threads)
    partial = archive.with_name(archive.name + ".partial")
    try:
        with partial.open("wb") as raw, compressor.stream_writer(raw) as zstd, \
                tarfile.open(fileobj=zstd, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                path = directory / name
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with path.open("rb") as f:
                    reader = _HashingReader(f, progress)
                    tar.addfile(info, cast(IO[bytes], reader))
                manifest[name] = {"size": info.size, "xxh3_128": reader.hash.hexdigest()}
            data = json.dumps({"format": 1, "files": manifest}, indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        partial.replace(archive)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class _CountingReader:
    """The compressed archive as zstd reads it, reporting progress."""

    def __init__(self, file: IO[bytes], progress: Progress | None) -> None:
        self._file = file
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        if self._progress is not None:
            self._progress(len(data))
        return data


def _write_sparse(source: IO[bytes], target: Path, size: int) -> str:
    """Copy `size` bytes to a new file, seeking over zero blocks; return the xxh3_128."""
    digest = xxhash.xxh3_128()
    remaining = size
    with target.open("wb") as out:
        while remaining:
            chunk = source.read(min(CHUNK, remaining))
            if not chunk:
                raise PackageError(f"{target.name} ends early")
            digest.update(chunk)
            remaining -= len(chunk)
            view = memoryview(chunk)
            for start in range(0, len(view), ZERO_BLOCK):
                piece = view[start:start + ZERO_BLOCK]
                if piece == _ZEROES[:len(piece)]:
                    out.seek(len(piece), 1)
                else:
                    out.write(piece)
        out.truncate(size)
    return digest.hexdigest()


def extract(archive: Path, directory: Path, progress: Progress | None = None) -> Package:
    """Unpack and verify `archive` into `directory` (new or empty); refuse a corrupt one."""
    if directory.exists() and any(directory.iterdir()):
        raise PackageError(f"{directory} is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return _extract(archive, directory, progress)
    except BaseException:
        for entry in directory.iterdir():
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        raise


def _extract(archive: Path, directory: Path, progress: Progress | None) -> Package:
    hashes: dict[str, tuple[int, str]] = {}
    manifest: dict[str, Any] | None = None
    try:
        decompressor = zstandard.ZstdDecompressor()
        with archive.open("rb") as raw, \
                decompressor.stream_reader(
                    cast(IO[bytes], _CountingReader(raw, progress))) as zstd, \
                tarfile.open(fileobj=zstd, mode="r|") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or "/" in name or name.startswith(".") or \
                        name in hashes or (manifest is not None):
                    raise PackageError(f"unexpected archive member {name!r}")
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has contents
                if name == MANIFEST:
                    manifest = json.loads(source.read())
                    continue
                hashes[name] = (member.size, _write_sparse(source, directory / name,
                                                           member.size))
    except PackageError as exc:
        raise PackageError(f"{archive}: corrupt package: {exc}") from exc
    except (zstandard.ZstdError, tarfile.TarError, EOFError, ValueError, KeyError) as exc:
        raise PackageError(f"{archive}: corrupt package: {exc}") from exc
    if manifest is None:
        raise PackageError(f"{archive}: corrupt package: no {MANIFEST} (truncated?)")
    expected = {name: (int(entry["size"]), str(entry["xxh3_128"]))
                for name, entry in manifest["files"].items()}
    for name in sorted(set(expected) | set(hashes)):
        if expected.get(name) != hashes.get(name):
            raise PackageError(f"{archive}: corrupt package: {name} does not match the "
                               f"manifest ({hashes.get(name)} vs {expected.get(name)})")
    return Package.load(directory)
