"""API tokens: random, shown once, stored only as their SHA-256.

A token is 32 random bytes (URL-safe text with a `roam_` prefix that says what it is);
the store keeps its digest under /tokens/DIGEST, so a copy of the store gives no token
away. A digest of a high-entropy secret needs no slow hash (there is nothing to guess).
"""

from __future__ import annotations

import hashlib
import secrets
import time

from roam.control.fleet import Fleet
from roam.control.models import Keys, TokenRecord
from roam.errors import ErrorCode, RoamError

PREFIX = "roam_"


class Unauthorized(RoamError):
    code = ErrorCode.UNAUTHORIZED


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create(fleet: Fleet, name: str) -> str:
    """A new token named `name` (for people: who or what holds it); returns it."""
    token = PREFIX + secrets.token_urlsafe(32)
    await fleet.create(Keys.token(digest(token)), TokenRecord(name=name, created=time.time()))
    return token


async def check(fleet: Fleet, token: str | None) -> TokenRecord:
    if not token:
        raise Unauthorized("give a token: Authorization: Bearer TOKEN (roam control token "
                           "create makes one)")
    record = await fleet.get(Keys.token(digest(token)), TokenRecord)
    if record is None:
        raise Unauthorized("that token is not valid here")
    return record.value
