"""How a watcher watches: which cloud, where its metadata service is, how often to ask.

The defaults are the documented ones (poll AWS every 5 s, GCP gives 30 s, the link-local
address 169.254.169.254 that all three clouds serve on); tests and demos shorten the
times.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from roam.spot.errors import BadConfig
from roam.spot.notice import Cloud

__all__ = ["AZURE_API_VERSION", "AZURE_COMPUTE_API_VERSION", "DEFAULT_METADATA",
           "MAX_TOKEN_TTL", "WatchConfig"]

DEFAULT_METADATA = "http://169.254.169.254"
"""All three clouds answer here (metadata.google.internal resolves to it on GCP); the
address is used, not the name, so that watching needs no DNS."""

MAX_TOKEN_TTL = 21600  # AWS's documented maximum (six hours)
AZURE_API_VERSION = "2020-07-01"
AZURE_COMPUTE_API_VERSION = "2021-02-01"


@dataclass(frozen=True)
class WatchConfig:
    cloud: Cloud
    metadata: str = DEFAULT_METADATA
    """Base URL of the metadata service (scheme, host, port; no path)."""
    interval: float = 5.0
    """Seconds between polls on AWS (its documented advice) and Azure. GCP's hanging
    GET returns as soon as the value changes, so it needs no interval."""
    timeout: float = 2.0
    """Seconds a request may take (connect, then each read) before it counts as failed;
    GCP's hanging GET gets `gcp_wait` more."""
    token_ttl: int = 21600
    """Seconds an AWS session token lives (1 to 21600, the documented range); the
    watcher renews it before that."""
    gcp_wait: int = 60
    """`timeout_sec` of GCP's hanging GET: the server answers after this many seconds
    even if nothing changed, which proves it is still there."""
    gcp_notice: float = 30.0
    """GCP's notice says only TRUE; its documented notice period gives the deadline."""
    azure_resource: str | None = None
    """This VM's name as Azure's events list it in Resources; None: ask IMDS once
    (/metadata/instance/compute/name)."""
    retry_min: float = 0.5
    retry_max: float = 10.0
    """Backoff between retries after a failure: doubling from `retry_min` to `retry_max`
    (well inside the shortest notice, GCP's and Azure's 30 s)."""
    max_body: int = 64 * 1024
    """A response larger than this is refused unread (a real notice is < 1 KiB)."""
    skew: float = 15.0
    """A deadline this many seconds in the past is still a notice: AWS's hibernate
    notice begins at once, so its time may have passed by the next poll (5 s), and
    clocks differ. Older ones are stale (AWS leaves the time of a failed termination in
    place)."""
    horizon: float = 3600.0
    """A deadline further ahead than this is absurd for a spot notice: refused."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.metadata)
        if parts.scheme not in ("http", "https") or not parts.hostname or \
                parts.path not in ("", "/") or parts.query:
            raise BadConfig(f"{self.metadata!r}: the metadata service needs an "
                            "http://HOST[:PORT] URL")
        if not 1 <= self.token_ttl <= MAX_TOKEN_TTL:
            raise BadConfig(f"an AWS token lives 1 to {MAX_TOKEN_TTL} s, not "
                            f"{self.token_ttl}")
        times = {"interval": self.interval, "timeout": self.timeout,
                 "gcp_wait": self.gcp_wait, "gcp_notice": self.gcp_notice,
                 "retry_min": self.retry_min, "retry_max": self.retry_max,
                 "max_body": self.max_body, "horizon": self.horizon}
        for name, value in times.items():
            if not value > 0:
                raise BadConfig(f"{name} must be positive, not {value}")
        if self.skew < 0:
            raise BadConfig(f"skew must not be negative, not {self.skew}")

    @property
    def token_renew_after(self) -> float:
        """Age at which the AWS token is replaced: well before it expires, so that a
        poll never carries an expired one (half its life for short tokens, a minute
        before the end for long ones)."""
        return self.token_ttl - min(self.token_ttl / 2, 60.0)
