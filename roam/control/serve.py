"""`roam control serve`: the store, the leader's reconciler and the API, in one process.

With the SQLite store one instance owns the data directory (an exclusive lock on
DIR/lock says so to a second one); it removes the leader key a killed predecessor left
(that key would otherwise keep it from leading for a whole TTL) and campaigns. The API
listens on loopback by default; give TLS files to serve HTTPS, and a CA to require
client certificates too.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import ssl
from pathlib import Path

from roam.control.api import Plane, create_app
from roam.control.election import Election
from roam.control.evacuation import Evacuation
from roam.control.fleet import Fleet
from roam.control.lost import LostNodes
from roam.control.metrics import FleetMetrics
from roam.control.models import Keys
from roam.control.reconciler import Reconciler
from roam.control.sqlite import SqliteStore
from roam.control.store import Store
from roam.errors import ErrorCode, RoamError
from roam.peer import api as peer_api

log = logging.getLogger("roam.control")

TTL = 10.0
"""Seconds a node's lease lives without a heartbeat (`--node-ttl`)."""


class DataLocked(RoamError):
    code = ErrorCode.CONFLICT


def lock(data: Path) -> int:
    """Hold DIR/lock (released when the process ends, however it ends)."""
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    fd = os.open(data / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataLocked(f"another control plane serves {data}") from None
    return fd


async def serve(data: Path, host: str, port: int, stop: asyncio.Event, *,
                tls: ssl.SSLContext | None = None, ttl: float = TTL,
                ready: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set."""
    fd = lock(data)
    try:
        store = await SqliteStore.open(data)
        try:
            await store.delete(Keys.LEADER)  # ours alone: see the module's docstring
            election = Election(store, identity(), ttl)
            await run(store, election, host, port, stop, tls=tls, ttl=ttl, ready=ready,
                      where=f"data in {data}")
        finally:
            await store.close()
    finally:
        os.close(fd)


def identity() -> str:
    """This instance's name in the election."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def run(store: Store, election: Election, host: str, port: int, stop: asyncio.Event,
              *, tls: ssl.SSLContext | None, ttl: float, ready: asyncio.Event | None,
              where: str) -> None:
    """Serve the API over `store` and reconcile while `election` says this instance
    leads, until `stop` is set (any store: SQLite here, etcd in roam.control.etcd)."""
    fleet = Fleet(store)
    plane = Plane(fleet, ttl, election, FleetMetrics())
    server = peer_api.server(create_app(plane), tls)
    sock = listen_socket(host, port)
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(server.serve(sockets=[sock]))
        reconciler = Reconciler(fleet, Evacuation(fleet, plane.metrics.evacuation),
                                LostNodes(fleet, ttl, plane.metrics.evacuation))
        leading = tasks.create_task(election.run(reconciler.run))
        log.info("control plane serving %s://%s:%d, %s",
                 "https" if tls else "http", host, sock.getsockname()[1], where)
        if ready is not None:
            ready.set()
        await stop.wait()
        leading.cancel()
        server.should_exit = True
        await serving


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock
