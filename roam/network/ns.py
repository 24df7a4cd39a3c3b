"""Network namespaces: create, remove, and run code or commands inside one.

setns(2) changes the namespace of the calling thread only, so code that must act inside
a VM's namespace (open its tap, write its sysctls) runs in a short-lived thread of its
own, and a command (nft) enters the namespace between fork and exec. The rest of the
process stays in the host's namespace.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import config, netns

from roam.errors import RoamError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)

# pyroute2 forks a child to act in a namespace and ends it with SIGTERM. A child that
# kept our SIGTERM handler writes the signal into the signal wakeup descriptor it shares
# with us, and our event loop takes it for a SIGTERM of its own (`roam run` suspended its
# VM at once): the child must die of SIGTERM's default action instead.
config.disable_mp_signal = True


class NetworkError(RoamError):
    """A namespace, link or rule could not be set up (code `internal`: the host's)."""


def path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def create(name: str) -> None:
    netns.create(name)


def remove(name: str) -> None:
    """Remove the namespace; its devices go with it (a veth's host end too). Idempotent."""
    if exists(name):
        netns.remove(name)


def enter(name: str) -> None:
    """Move the calling thread into namespace `name`."""
    fd = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NetworkError(f"setns {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def call_in(name: str | None, function: Callable[[], T]) -> T:
    """function() in namespace `name` (None: here), on a thread that ends afterwards."""
    if name is None:
        return function()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            enter(name)
            result.append(function())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def sysctl(name: str | None, key: str, value: str) -> None:
    """Write /proc/sys/KEY (slash-separated) in namespace `name`: /proc/sys/net is that of
    the writing thread."""
    target = Path("/proc/sys") / key
    call_in(name, lambda: target.write_text(value))


def run(name: str | None, argv: list[str], stdin: str = "") -> str:
    """Run a command in namespace `name` (None: here); its stdout, NetworkError on failure."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False,
                          preexec_fn=None if name is None else lambda: enter(name))
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout
