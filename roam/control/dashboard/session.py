"""The dashboard's login and its guard against cross-site requests.

A browser cannot send `Authorization: Bearer`, so the login form takes an API token
and keeps it in a cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's
page sends it), Secure when served over TLS, scoped to the whole server. Every request
checks it against the store as the API checks a bearer token, so a revoked token ends
its sessions at once and nothing else needs storing.

Actions (a form POST) must also pass three checks of where they come from: the form's
`csrf` field, an HMAC of the token that only a page rendered for this session holds;
`Sec-Fetch-Site`, when the browser sends it, `same-origin` (or `none`: typed by the
user); and `Origin`, when sent, this server's own.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from roam.control import auth
from roam.control.fleet import Fleet
from roam.errors import ErrorCode, RoamError

COOKIE = "roam_session"
FORM_LIMIT = 4096
"""Bytes of form body read at most: every form here is a few short fields."""
FIELD_LIMIT = 16


class Forbidden(RoamError):
    """A request that did not come from the dashboard's own page."""

    code = ErrorCode.UNAUTHORIZED


class BadForm(RoamError):
    code = ErrorCode.BAD_REQUEST


def csrf(token: str) -> str:
    """The form token of the session that holds `token`."""
    return hmac.new(token.encode(), b"roam dashboard csrf", hashlib.sha256).hexdigest()


async def session(fleet: Fleet, request: Request) -> str | None:
    """The valid API token of the request's cookie, if any."""
    token = request.cookies.get(COOKIE)
    return token if token and await valid(fleet, token) else None


async def valid(fleet: Fleet, token: str) -> bool:
    """Whether `token` is (still) a token of the store."""
    try:
        await auth.check(fleet, token)
    except auth.Unauthorized:
        return False
    return True


def log_in(response: Response, request: Request, token: str) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")


def log_out(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, httponly=True, samesite="strict", path="/",
                           secure=request.url.scheme == "https")


def same_origin(request: Request) -> None:
    """Refuse a request another site's page made (Forbidden)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden(f"a {site} request: actions come from the dashboard's own page")
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own:
            raise Forbidden(f"a request from {origin}: actions come from {own}")


async def form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body as fields (BadForm if it is not one)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise BadForm("send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise BadForm(f"a form of more than {FORM_LIMIT} bytes")
    try:
        fields = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False,
                           max_num_fields=FIELD_LIMIT)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadForm(f"the form does not parse: {e}") from None
    return dict(fields)


def check_csrf(token: str, fields: dict[str, str]) -> None:
    if not hmac.compare_digest(fields.get("csrf", "").encode(), csrf(token).encode()):
        raise Forbidden("the form's csrf field is missing or wrong: reload the page")
