"""GCP: Compute Engine's `instance/preempted` metadata value, watched with a hanging GET.

Every request carries `Metadata-Flavor: Google` (the server answers 403 without it) and
every genuine answer carries the same header back, which is how a client knows it spoke
to the metadata server and not to something else on that address. The value is the text
TRUE or FALSE; it turns TRUE when Compute Engine preempts the VM, which then has 30 s
before it is stopped. `?wait_for_change=true&last_etag=E` holds the request until the
value's ETag differs from E (at once if it already does), `timeout_sec` bounds the wait;
the documented advice for 503 (maintenance) and 429 is to retry.
"""

from __future__ import annotations

import datetime as dt
import string
from collections.abc import Callable

import httpx

from roam.spot.config import WatchConfig
from roam.spot.errors import BadMetadata
from roam.spot.http import Response, fetch, unexpected
from roam.spot.notice import Action, Cloud, Notice

__all__ = ["FLAVOR_HEADER", "PREEMPTED_PATH", "GcpSource", "parse_preempted"]

PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
_ETAG_CHARS = frozenset(string.ascii_letters + string.digits + "-_.:+/=")


def parse_preempted(response: Response) -> tuple[bool, str]:
    """The value and its ETag from an answer about instance/preempted."""
    if response.status == 403:
        raise BadMetadata("preempted: forbidden (HTTP 403): the request lacked "
                          "Metadata-Flavor: Google or went through a proxy")
    if response.status != 200:
        raise unexpected("preempted", response)
    if response.header(FLAVOR_HEADER) != FLAVOR:
        raise BadMetadata("preempted: the answer lacks Metadata-Flavor: Google, so it did "
                          "not come from a GCE metadata server")
    etag = response.header("etag")
    if etag is None or not 0 < len(etag) <= 128 or not set(etag) <= _ETAG_CHARS:
        raise BadMetadata("preempted: the answer has no valid ETag")
    value = response.body.strip()
    if value not in (b"TRUE", b"FALSE"):
        raise BadMetadata("preempted: the value is neither TRUE nor FALSE")
    return value == b"TRUE", etag


class GcpSource:
    """Reads the value once, then hangs on it: each answer comes as soon as it changes
    (or after `gcp_wait` s with the same value). A notice is made when it turns TRUE."""

    cloud = Cloud.GCP

    def __init__(self, http: httpx.AsyncClient, config: WatchConfig,
                 clock: Callable[[], dt.datetime]) -> None:
        self._http = http
        self._config = config
        self._clock = clock
        self._etag: str | None = None
        self._preempted = False

    def pause(self, elapsed: float) -> float:
        """None after a wait that hung; a little after one that came back at once, so
        that a server which never hangs is not asked in a busy loop."""
        return max(0.0, self._config.interval / 5 - elapsed)

    async def poll(self) -> list[Notice]:
        if self._etag is None:  # the value now: a TRUE already there is a notice too
            params, wait = {}, None
        else:
            params = {"wait_for_change": "true", "last_etag": self._etag,
                      "timeout_sec": str(self._config.gcp_wait)}
            wait = self._config.gcp_wait + self._config.timeout
        response = await fetch(self._http, "GET", PREEMPTED_PATH, params=params,
                               headers={FLAVOR_HEADER: FLAVOR},
                               max_body=self._config.max_body, read_timeout=wait)
        preempted, etag = parse_preempted(response)
        self._etag = etag
        turned = preempted and not self._preempted
        self._preempted = preempted
        if not turned:
            return []
        # A hanging GET answers as the value turns: the notice period starts about now.
        seen = self._clock()
        return [Notice(cloud=Cloud.GCP, action=Action.PREEMPT, event_id=etag, seen=seen,
                       deadline=seen + dt.timedelta(seconds=self._config.gcp_notice))]

    async def acknowledge(self, notice: Notice) -> None:
        """GCP takes no acknowledgement."""
