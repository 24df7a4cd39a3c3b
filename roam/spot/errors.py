"""What can go wrong while asking a cloud's metadata service about a spot notice.

The watcher decides by type what to do: `MetadataUnavailable` is retried with backoff,
`TokenRejected` makes the AWS source fetch a new session token, `BadMetadata` is logged
once per distinct problem and never acted on. None of them is ever turned into a notice.
"""

from __future__ import annotations

from roam.errors import ErrorCode, RoamError

__all__ = ["BadConfig", "BadMetadata", "MetadataError", "MetadataUnavailable",
           "TokenRejected"]


class BadConfig(RoamError):
    """A WatchConfig that cannot work (a URL that is not http://HOST[:PORT], a token TTL
    outside AWS's range, a time that is not positive)."""

    code = ErrorCode.BAD_REQUEST


class MetadataError(RoamError):
    """Base of the metadata service's failures as the spot watcher sees them."""


class MetadataUnavailable(MetadataError):
    """No usable answer: connection refused or reset, a timeout, a 5xx or a 429.

    Transient by nature (the documented advice of all three clouds is to retry)."""

    code = ErrorCode.TIMEOUT


class BadMetadata(MetadataError):
    """An answer roam will not act on: an unexpected status, a missing or wrong header,
    a body that is not the documented document, too large a body, a deadline already
    past or absurdly far. Its message is the one line logged, so it never holds the
    whole body (a hostile one could be large)."""


class TokenRejected(MetadataError):
    """AWS answered 401: the IMDSv2 session token expired or is not valid; the documented
    remedy is a new token."""
