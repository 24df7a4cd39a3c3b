"""The peer's own error type (requests it cannot carry out)."""

from __future__ import annotations

from roam.errors import RoamError

__all__ = ["PeerError"]


class PeerError(RoamError):
    """A peer request failed; the message says why, the code how to react."""
