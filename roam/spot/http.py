"""One request to a metadata service, bounded in time and size, as a plain `Response`.

Parsers take a `Response` (status, headers, body), never an httpx object, so that they
are pure functions that hypothesis can feed anything. Network failures become
MetadataUnavailable here; nothing else does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError

from roam.spot.errors import BadMetadata, MetadataUnavailable

__all__ = ["Response", "client", "fetch", "invalid", "unexpected"]


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    """Header names in lower case."""
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def client(base_url: str, timeout: float) -> httpx.AsyncClient:
    """A client for one metadata service. trust_env=False: a proxy set in the
    environment must never see metadata requests (AWS and Azure refuse proxied ones,
    and a token must not leave the host). No compression: the size limit applies to
    what the server sends."""
    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout),
                             trust_env=False, follow_redirects=False,
                             headers={"accept-encoding": "identity"})


async def fetch(http: httpx.AsyncClient, method: str, path: str, *, max_body: int,
                headers: Mapping[str, str] | None = None,
                params: Mapping[str, str] | None = None, content: bytes | None = None,
                read_timeout: float | None = None) -> Response:
    """Send one request; the body is read up to `max_body` bytes (BadMetadata beyond)."""
    timeout = (httpx.USE_CLIENT_DEFAULT if read_timeout is None else
               httpx.Timeout(http.timeout.connect, read=read_timeout))
    try:
        async with http.stream(method, path, headers=headers, params=params,
                               content=content, timeout=timeout) as response:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_body:
                raise BadMetadata(f"{method} {path}: body of {length} bytes exceeds "
                                  f"{max_body}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_body:
                    raise BadMetadata(f"{method} {path}: body exceeds {max_body} bytes")
            headers_ = {k.lower(): v for k, v in response.headers.items()}
            return Response(response.status_code, headers_, bytes(body))
    except httpx.HTTPError as exc:
        raise MetadataUnavailable(f"{method} {path}: {type(exc).__name__}"
                                  f"{': ' + str(exc) if str(exc) else ''}") from None


def unexpected(what: str, response: Response) -> MetadataUnavailable | BadMetadata:
    """The error for a status the documents do not give for `what`: 5xx and 429 are
    transient (retried), anything else is a refusal that retrying at once won't fix."""
    if response.status >= 500 or response.status == 429:
        return MetadataUnavailable(f"{what}: HTTP {response.status}")
    return BadMetadata(f"{what}: unexpected HTTP {response.status}")


def invalid(what: str, exc: ValidationError) -> BadMetadata:
    """A body that failed validation, as one line that names the field, never the input."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return BadMetadata(f"{what}: {where}: {first['msg']}")
