"""AWS: IMDSv2's spot instance-action, as the EC2 user guide documents it.

A session token first: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
(1 to 21600) answers the token as text (400 if the TTL header is missing or invalid, 403
if IMDS is off). Then `GET /latest/meta-data/spot/instance-action` with
`X-aws-ec2-metadata-token`: 404 while no interruption is planned; 200 and
`{"action": "terminate"|"stop"|"hibernate", "time": "2017-09-18T08:22:00Z"}` once it
is (two minutes ahead, except hibernate, which begins at once); 401 when the token
expired or is invalid (the remedy: a new token). AWS advises checking every 5 s.
"""

from __future__ import annotations

import datetime as dt
import string
import time
from collections.abc import Callable
from typing import Annotated, Literal

import httpx
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from roam.spot.config import WatchConfig
from roam.spot.errors import BadMetadata, TokenRejected
from roam.spot.http import Response, fetch, invalid, unexpected
from roam.spot.notice import Action, Cloud, Notice, check_deadline

__all__ = ["ACTION_PATH", "TOKEN_HEADER", "TOKEN_PATH", "TTL_HEADER", "AwsSource",
           "parse_instance_action", "parse_token"]

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "+/=_-.~")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class _InstanceAction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    action: Literal["terminate", "stop", "hibernate"]
    time: Annotated[str, StringConstraints(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]


def parse_token(response: Response) -> str:
    """The session token of a 200 answer to the token PUT."""
    if response.status == 400:
        raise BadMetadata("token: refused as missing or invalid parameters (HTTP 400)")
    if response.status == 403:
        raise BadMetadata("token: forbidden (HTTP 403): IMDS is turned off, or the "
                          "request went through a proxy")
    if response.status != 200:
        raise unexpected("token", response)
    token = response.body.strip()
    if not 0 < len(token) <= 1024 or not set(token.decode("latin-1")) <= _TOKEN_CHARS:
        raise BadMetadata("token: the answer is not a token")
    return token.decode("ascii")


def parse_instance_action(response: Response, *, now: dt.datetime, skew: float,
                          horizon: float) -> Notice | None:
    """The notice in an answer to GET instance-action: None for the documented 404."""
    if response.status == 404:
        return None
    if response.status == 401:
        raise TokenRejected("instance-action: token rejected (HTTP 401)")
    if response.status != 200:
        raise unexpected("instance-action", response)
    try:
        item = _InstanceAction.model_validate_json(response.body)
    except ValidationError as exc:
        raise invalid("instance-action", exc) from None
    try:
        deadline = dt.datetime.strptime(item.time, _TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise BadMetadata("instance-action: time is not a valid date") from None
    check_deadline(deadline, now, skew=skew, horizon=horizon)
    return Notice(cloud=Cloud.AWS, action=Action(item.action), deadline=deadline,
                  event_id=f"{item.action}@{item.time}", seen=now)


class AwsSource:
    """Polls instance-action with a session token that it renews before it expires,
    and once more at once when AWS says 401."""

    cloud = Cloud.AWS

    def __init__(self, http: httpx.AsyncClient, config: WatchConfig,
                 clock: Callable[[], dt.datetime]) -> None:
        self._http = http
        self._config = config
        self._clock = clock
        self._token: str | None = None
        self._token_at = 0.0
        self.tokens = 0
        """Tokens fetched so far (each renewal or 401 adds one)."""

    def pause(self, elapsed: float) -> float:
        return max(0.0, self._config.interval - elapsed)

    async def _session(self) -> str:
        age = time.monotonic() - self._token_at
        if self._token is None or age >= self._config.token_renew_after:
            response = await fetch(self._http, "PUT", TOKEN_PATH,
                                   headers={TTL_HEADER: str(self._config.token_ttl)},
                                   max_body=self._config.max_body)
            self._token = parse_token(response)
            self._token_at = time.monotonic()
            self.tokens += 1
        return self._token

    async def _ask(self) -> Notice | None:
        response = await fetch(self._http, "GET", ACTION_PATH,
                               headers={TOKEN_HEADER: await self._session()},
                               max_body=self._config.max_body)
        return parse_instance_action(response, now=self._clock(), skew=self._config.skew,
                                     horizon=self._config.horizon)

    async def poll(self) -> list[Notice]:
        try:
            notice = await self._ask()
        except TokenRejected:
            self._token = None  # expired early (or revoked): the documented remedy
            notice = await self._ask()
        return [] if notice is None else [notice]

    async def acknowledge(self, notice: Notice) -> None:
        """AWS takes no acknowledgement."""
