"""A peer's index of the packages it holds: blake3 per 64 KiB chunk of their files.

A destination that holds the package a migrating VM was resumed from (the same root
disk, the memory image of the same snapshot) offers its content by digest
(`NewDevice(existing=True, digests=...)`); the source then names every chunk that still
matches instead of sending it: the used blocks of the root disk, the guest memory the
guest has not changed since the snapshot. Hashing a package's files costs a full read of
them, so each file's digests are computed once per version of the file (path, size,
modification time, inode) and kept in `cache_dir`.

A package is named by `package_id`, a hash of its config.json: the source names it in
the group (`Group.package`) so that the destination offers the right package's files.
Digests, not ids, decide what is substituted: a destination holding another package under
the same id offers digests that do not match, and the source sends those chunks.

Where a peer keeps this (`HeldPackages`, STATE_DIR/packages): `held/ID`, a symlink to the
directory of each package the peer holds (it ran a VM from it, or was given it with
`roam peer serve --package`), and `digests/`, the index's cache. Package directories stay
where they are and are only read: an arriving VM's memory and disk are copy-on-write
overlays over their files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3

from roam.migration.content import CHUNK, ContentDigests, digest_chunks
from roam.vm.package import Package, PackageConfig, PackageError

log = logging.getLogger(__name__)

ID = re.compile(r"[0-9a-f]{32}")
MAGIC = b"RDIG1"
_HEAD = struct.Struct("!5sIQ")  # magic, chunk, size
_NONE = bytes(32)  # a zero chunk (blake3 never gives 32 zero bytes in practice)
READ = 16 * 1024 * 1024


def package_id(config: PackageConfig) -> str:
    """A package's name in the index: a hash of its config (blueprint, creation time,
    sizes and file names), so the same snapshot copied to another host has the same id,
    and a running VM's source names it from the config in its vm.json."""
    return blake3.blake3(config.model_dump_json().encode()).hexdigest()[:32]


@dataclass(frozen=True)
class HeldFile:
    """A file of a held package that can back a destination device."""

    path: Path
    digests: ContentDigests


class PackageIndex:
    """The packages this peer holds, by id, with the digests of their device files."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._packages: dict[str, dict[str, HeldFile]] = {}

    async def add(self, directory: Path) -> str:
        """Index a package directory (hashing files whose digests are not cached yet, in
        a thread: the peer keeps serving); returns its id."""
        package = Package.load(directory)
        files = package.config.files
        held: dict[str, HeldFile] = {}
        for device, name in (("memory", files.memory), ("disk", files.disk)):
            path = package.path(name)
            held[device] = HeldFile(path, await asyncio.to_thread(self.digests, path))
        ident = package_id(package.config)
        self._packages[ident] = held
        return ident

    def lookup(self, package: str, device: str, size: int) -> HeldFile | None:
        """The held file for a device of a VM from `package`, if its size matches."""
        held = self._packages.get(package, {}).get(device)
        return held if held is not None and held.digests.size == size else None

    def packages(self) -> list[str]:
        return sorted(self._packages)

    def digests(self, path: Path, chunk: int = CHUNK) -> ContentDigests:
        """The digests of one file, from the cache when the file has not changed."""
        st = os.stat(path)
        key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{chunk}"
        cached = self.cache_dir / f"{blake3.blake3(key.encode()).hexdigest()[:32]}.digests"
        found = _load(cached, chunk, st.st_size)
        if found is not None:
            return found
        digests = digest_file(path, chunk)
        _save(cached, digests)
        return digests


class HeldPackages:
    """The packages this peer holds, recorded under `root` (STATE_DIR/packages), and
    their index. Held means: recorded here, and the directory still holds a package with
    that id; a package moved away or replaced is simply no longer offered."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.index = PackageIndex(root / "digests")

    @property
    def _held(self) -> Path:
        return self.root / "held"

    def hold(self, directory: Path) -> str:
        """Record that this peer holds the package in `directory`; returns its id."""
        ident = package_id(Package.load(directory).config)
        self._held.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        link = self._held / ident
        tmp = self._held / f".{ident}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(directory.resolve())
        os.replace(tmp, link)  # a package copied elsewhere under the same id: the latest
        return ident

    def held(self) -> dict[str, Path]:
        """Id to directory of every package recorded here (whether still there or not)."""
        if not self._held.is_dir():
            return {}
        return {link.name: Path(os.readlink(link)) for link in self._held.iterdir()
                if ID.fullmatch(link.name) and link.is_symlink()}

    async def warm(self, directory: Path) -> None:
        """Hash the package's files now (in a thread) so that the first VM that arrives
        does not wait for it; a failure only means the hashing happens then."""
        try:
            await self.index.add(directory)
        except (OSError, PackageError) as exc:
            log.warning("cannot index the package in %s: %s", directory, exc)

    async def offer(self, package: str, device: str, size: int) -> HeldFile | None:
        """The held file that can back `device` (of `size` bytes) of a VM made from
        `package`, its digests from the cache or computed now; None when this peer does
        not hold that package."""
        if not ID.fullmatch(package):
            return None
        directory = self.held().get(package)
        if directory is None:
            return None
        try:
            ident = await self.index.add(directory)
        except (OSError, PackageError) as exc:
            log.warning("held package %s in %s is unusable: %s", package, directory, exc)
            return None
        return self.index.lookup(package, device, size) if ident == package else None


def digest_file(path: Path, chunk: int = CHUNK) -> ContentDigests:
    """Hash a file chunk by chunk (a full read)."""
    step = max(chunk, READ - READ % chunk)
    digests: list[bytes | None] = []
    size = 0
    with path.open("rb") as f:
        while data := f.read(step):
            digests += digest_chunks(data, chunk)
            size += len(data)
    return ContentDigests(chunk, size, tuple(digests))


def _load(path: Path, chunk: int, size: int) -> ContentDigests | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    count = -(-size // chunk)
    if len(data) != _HEAD.size + 32 * count or _HEAD.unpack_from(data) != (MAGIC, chunk, size):
        return None  # another version of the format, or a torn write: hash again
    body = memoryview(data)[_HEAD.size :]
    digests = tuple(None if (d := bytes(body[i * 32 : (i + 1) * 32])) == _NONE else d
                    for i in range(count))
    return ContentDigests(chunk, size, digests)


def _save(path: Path, digests: ContentDigests) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(_HEAD.pack(MAGIC, digests.chunk, digests.size)
                    + b"".join(_NONE if d is None else d for d in digests.digests))
    os.replace(tmp, path)
