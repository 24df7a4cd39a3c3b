"""The key a peer syncs with: content addresses and encryption at rest.

One 32-byte secret, kept in the peer's state directory (mode 0600), gives two keys by
blake3's key derivation: one for *addresses* (an object's name is the keyed blake3 of its
plaintext, so identical chunks get one name and one object, yet nobody without the key
can tell from names that two tenants store the same data), one for AES-256-GCM (a
random 96-bit nonce per object; the object's name is its associated data, so an object
copied under another name fails to open).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from roam.storage.provider import Buffer
from roam.sync.errors import CorruptObject, SyncError

KEY_FILE = "sync.key"
"""The key's file in a peer's state directory."""
KEY_LEN = 32
NONCE_LEN = 12
MAGIC = b"RSO1"  # roam sync object, format 1: MAGIC, nonce, AES-GCM ciphertext and tag
ADDRESS_LEN = 32
ZERO = bytes(ADDRESS_LEN)
"""The address of a chunk that is all zero: no object is stored for it."""


class SyncKey:
    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_LEN:
            raise SyncError(f"a sync key is {KEY_LEN} bytes, not {len(secret)}")
        self.secret = secret
        self._address_key = blake3.blake3(secret, derive_key_context=(
            "roam 2026-12 sync content address")).digest()
        self._aead = AESGCM(blake3.blake3(secret, derive_key_context=(
            "roam 2026-12 sync object encryption")).digest())

    @classmethod
    def load_or_create(cls, path: Path) -> SyncKey:
        """The key in `path`, made (random, mode 0600) if there is none."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path)
        secret = secrets.token_bytes(KEY_LEN)
        with os.fdopen(fd, "wb") as out:
            out.write(secret)
        return cls(secret)

    @classmethod
    def load(cls, path: Path) -> SyncKey:
        if path.stat().st_mode & 0o077:
            raise SyncError(f"{path} is readable by others: a sync key must be mode 0600")
        return cls(path.read_bytes())

    def address(self, data: Buffer) -> bytes:
        """The content address of `data` (keyed blake3)."""
        return blake3.blake3(data, key=self._address_key, max_threads=1).digest()

    def seal(self, name: bytes, data: Buffer) -> bytes:
        """`data` encrypted and authenticated, bound to `name`."""
        nonce = secrets.token_bytes(NONCE_LEN)
        return MAGIC + nonce + self._aead.encrypt(nonce, bytes(data), name)

    def open(self, name: bytes, blob: Buffer) -> bytes:
        """The plaintext of a sealed object; CorruptObject if it was altered, is bound to
        another name, or was sealed with another key."""
        view = memoryview(blob)
        head = len(MAGIC) + NONCE_LEN
        if len(view) < head + 16 or view[: len(MAGIC)] != MAGIC:
            raise CorruptObject("not a roam sync object")
        try:
            return self._aead.decrypt(bytes(view[len(MAGIC) : head]), view[head:], name)
        except InvalidTag:
            raise CorruptObject("object fails authentication (altered, misnamed, or "
                                "sealed with another key)") from None

    def verified(self, address: bytes, blob: Buffer) -> bytes:
        """The plaintext of the object stored under `address`, checked against it."""
        data = self.open(address, blob)
        if self.address(data) != address:
            raise CorruptObject("object content does not match its address")
        return data
