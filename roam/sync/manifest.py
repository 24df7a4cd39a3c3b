"""Where things are in the store, and the manifest of a sync point.

Layout under s3://BUCKET/PREFIX (every VM syncing there shares the objects, so one base
image or one zero run is stored once):

    objects/AB/ABCD...     one chunk: MAGIC, nonce, AES-GCM(chunk), named by its address
    N/manifests/SEQ        VM N's sync points (SEQ: 16 digits, rising), sealed the same way

A manifest names, per device of the group, the address of every chunk (the all-zero
address for a chunk that is all zero: no object). Everything a restore from
s3://BUCKET/PREFIX/N needs is in the newest manifest: the devices' names, sizes and block
sizes, the chunk size, and the objects. `sealed` marks a consistent point (every device
as of one instant, taken with the VM paused); a running VM's sync points are not sealed:
each chunk is as of its last upload.
"""

from __future__ import annotations

import base64
import re
import time

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from roam.sync.crypto import ADDRESS_LEN, SyncKey
from roam.sync.errors import CorruptObject

FORMAT = 1
Addresses = npt.NDArray[np.uint8]  # (chunks, 32)
_SEQ = re.compile(r"^(\d{16})$")


def object_key(address: bytes) -> str:
    text = address.hex()
    return f"objects/{text[:2]}/{text}"


def address_of(key: str) -> bytes | None:
    """The address an object key names (None for a key that is not an object's)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "objects" or len(parts[2]) != 2 * ADDRESS_LEN:
        return None
    try:
        return bytes.fromhex(parts[2])
    except ValueError:
        return None


def manifests_prefix(vm: str) -> str:
    return f"{vm}/manifests/"


def manifest_key(vm: str, seq: int) -> str:
    return f"{manifests_prefix(vm)}{seq:016d}"


def seq_of(key: str, vm: str) -> int | None:
    match = _SEQ.match(key.removeprefix(manifests_prefix(vm)))
    return int(match.group(1)) if key.startswith(manifests_prefix(vm)) and match else None


class DeviceManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")
    size: int = Field(ge=0, le=1 << 50)
    block_size: int = Field(ge=4096, le=1 << 24)
    chunks: str  # base64 of 32 bytes per chunk, in order: the chunk's address

    def addresses(self) -> Addresses:
        raw = base64.b64decode(self.chunks, validate=True)
        if len(raw) % ADDRESS_LEN:
            raise ValueError("chunk addresses are not 32 bytes each")
        return np.frombuffer(raw, dtype=np.uint8).reshape(-1, ADDRESS_LEN)


class Manifest(BaseModel):
    """One sync point of one VM (format 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT
    vm: str
    seq: int = Field(ge=0)
    created: float  # wall clock, seconds
    chunk_size: int = Field(ge=4096, le=1 << 30)
    sealed: bool = False  # a consistent point (VM paused): see the module docstring
    epoch: int = 0  # the authority epoch the VM had (a restore raises it)
    devices: list[DeviceManifest] = Field(max_length=1024)

    @classmethod
    def build(cls, vm: str, seq: int, chunk_size: int,
              devices: list[tuple[str, int, int, Addresses]], *, sealed: bool = False,
              epoch: int = 0) -> Manifest:
        return cls(vm=vm, seq=seq, created=time.time(), chunk_size=chunk_size,
                   sealed=sealed, epoch=epoch, devices=[
                       DeviceManifest(name=name, size=size, block_size=bs,
                                      chunks=base64.b64encode(addr.tobytes()).decode())
                       for name, size, bs, addr in devices])

    def device(self, name: str) -> DeviceManifest:
        for dev in self.devices:
            if dev.name == name:
                return dev
        raise KeyError(name)

    def referenced(self) -> set[bytes]:
        """Every object address the sync point needs (zero chunks have none)."""
        found: set[bytes] = set()
        for dev in self.devices:
            addresses = dev.addresses()
            found.update(bytes(a) for a in np.unique(addresses, axis=0) if a.any())
        return found

    def seal(self, key: SyncKey) -> bytes:
        return key.seal(manifest_key(self.vm, self.seq).encode(),
                        self.model_dump_json().encode())

    @classmethod
    def open(cls, key: SyncKey, vm: str, seq: int, blob: bytes) -> Manifest:
        """A manifest read from the store: authenticated (bound to its key), parsed, and
        checked to be the one asked for."""
        text = key.open(manifest_key(vm, seq).encode(), blob)
        try:
            manifest = cls.model_validate_json(text)
            for dev in manifest.devices:
                if len(dev.addresses()) != -(-dev.size // manifest.chunk_size):
                    raise ValueError(f"device {dev.name} has the wrong number of chunks")
        except (ValidationError, ValueError) as exc:
            raise CorruptObject(f"manifest {vm}/{seq} is not valid: {exc}") from None
        if manifest.vm != vm or manifest.seq != seq or manifest.format != FORMAT:
            raise CorruptObject(f"manifest {vm}/{seq} names {manifest.vm}/{manifest.seq}")
        return manifest
