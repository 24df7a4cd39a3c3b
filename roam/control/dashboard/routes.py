"""The dashboard's routes, on the control plane's own HTTP server.

`/` is the page, rendered on the server (Jinja2) from a `Board`; `/ui/stream` keeps it
current: server-sent events, each the new HTML of one section of the page (named as the
section), sent when that section's HTML changed, so the page's small script only swaps
sections and never renders anything itself. `/login` and `/logout` hold the session
(roam.control.dashboard.session); `/ui/static/` the stylesheet and script, which hold
no data (the login page needs them before a session exists).

Actions are the API's own requests, made in process with the session's token: the
dashboard adds no rule of its own to what a migrate, stop, start or drain may do, and
an action the API refuses answers with the API's problem document.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from roam.control import auth
from roam.control.dashboard import plots, session
from roam.control.dashboard.board import Board
from roam.control.fleet import Fleet
from roam.control.store import Compacted

SECTIONS = ("summary", "nodes", "vms", "migrations", "plots")
"""The page's live sections, each a template `_NAME.html` and an element id."""
HEADERS = {
    # scripts and styles from this server only (style attributes set the bars' widths);
    # never in a frame (a framed page could be clicked through); forms post only here
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; frame-ancestors "
                               "'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
"""Headers of every page: what the browser may load and do with it."""


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("roam.control.dashboard"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = _size
    env.filters["clock"] = plots.clock
    env.globals["plots"] = plots
    return env


def mount(app: FastAPI, fleet: Fleet) -> None:
    """Serve the dashboard on `app` (the control plane's API)."""
    templates = _environment()
    ui = APIRouter(include_in_schema=False)

    def render(name: str, **context: Any) -> str:
        return templates.get_template(name).render(**context)

    def sections(board: Board, token: str) -> dict[str, str]:
        context = {"board": board, "csrf": session.csrf(token), "now": time.time()}
        return {name: render(f"_{name}.html", **context) for name in SECTIONS}

    @ui.get("/")
    async def page(request: Request) -> Response:
        token = await session.session(fleet, request)
        if token is None:
            return RedirectResponse("/login", status_code=303)
        board, _ = await Board.load(fleet)
        return HTMLResponse(render("board.html", sections=sections(board, token),
                                   csrf=session.csrf(token)), headers=HEADERS)

    @ui.get("/login")
    async def login_form(request: Request) -> Response:
        if await session.session(fleet, request) is not None:
            return RedirectResponse("/", status_code=303)
        return HTMLResponse(render("login.html", error=None), headers=HEADERS)

    @ui.post("/login")
    async def login(request: Request) -> Response:
        session.same_origin(request)
        token = (await session.form(request)).get("token", "").strip()
        try:
            await auth.check(fleet, token)
        except auth.Unauthorized as e:
            return HTMLResponse(render("login.html", error=str(e)), status_code=401,
                                headers=HEADERS)
        response = RedirectResponse("/", status_code=303)
        session.log_in(response, request, token)
        return response

    @ui.post("/logout")
    async def logout(request: Request) -> Response:
        await _guard(fleet, request)
        response = RedirectResponse("/login", status_code=303)
        session.log_out(response, request)
        return response

    async def logged_in(request: Request) -> str:
        """The session's token (checked before a stream begins: once it has, its status
        is sent)."""
        token = await session.session(fleet, request)
        if token is None:
            raise session.Forbidden("log in first")
        return token

    @ui.get("/ui/stream", response_class=EventSourceResponse)
    async def stream(token: str = Depends(logged_in)) -> AsyncIterator[ServerSentEvent]:
        board, revision = await Board.load(fleet)
        sent: dict[str, str] = {}

        def changed() -> list[ServerSentEvent]:
            fresh = sections(board, token)
            news = [ServerSentEvent(event=name, raw_data=html)
                    for name, html in fresh.items() if sent.get(name) != html]
            sent.update(fresh)
            return news

        for event in changed():
            yield event
        try:
            async with fleet.store.watch("/", revision) as changes:
                async for change in changes:
                    if not await board.apply(fleet, change.key, None if change.record
                                             is None else change.record.value):
                        continue
                    news = changed()
                    if news and not await session.valid(fleet, token):
                        return  # revoked: the browser's reconnection is refused
                    for event in news:
                        yield event
        except Compacted:
            return  # the browser connects again and gets a new board

    @ui.post("/ui/vms/{name}/{action}")
    async def vm_action(request: Request, name: str,
                        action: Literal["migrate", "stop", "start"]) -> Response:
        token, fields = await _guard(fleet, request)
        body: dict[str, Any] = {}
        if action == "migrate":
            to = fields.get("to", "")
            body = {"to": to} if to else {}
        return await _call(request, token, f"/vms/{name}/{action}", body,
                           f"{action} {name}" + (f" to {body['to']}" if body else ""))

    @ui.post("/ui/nodes/{name}/{action}")
    async def node_action(request: Request, name: str,
                          action: Literal["drain", "uncordon"]) -> Response:
        token, _ = await _guard(fleet, request)
        return await _call(request, token, f"/nodes/{name}/{action}",
                           {} if action == "drain" else None, f"{action} {name}")

    app.include_router(ui)
    app.mount("/ui/static", StaticFiles(packages=[("roam.control.dashboard", "static")]),
              name="dashboard-static")


async def _guard(fleet: Fleet, request: Request) -> tuple[str, dict[str, str]]:
    """An action's session token and form, once it passed every check of where it came
    from (session.Forbidden otherwise)."""
    token = await session.session(fleet, request)
    if token is None:
        raise session.Forbidden("log in first")
    session.same_origin(request)
    fields = await session.form(request)
    session.check_csrf(token, fields)
    return token, fields


async def _call(request: Request, token: str, path: str, body: dict[str, Any] | None,
                what: str) -> Response:
    """POST `path` of the API in process, as the session's token; the API's problem if it
    refuses, else the page again (or, for the page's script, a line saying what began)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=request.app),
                                 base_url="http://control") as client:
        answer = await client.post(path, json=body,
                                   headers={"Authorization": f"Bearer {token}"})
    if answer.status_code >= 400:
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type"))
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"ok": True, "detail": f"{what}: requested"},
                            status_code=answer.status_code)
    return RedirectResponse("/", status_code=303)

