"""systemd for `roam peer serve`: its unit, and the readiness protocol of Type=notify.

`notify` is sd_notify(3): one datagram of `KEY=VALUE` lines to the AF_UNIX socket that
$NOTIFY_SOCKET names (a leading `@` means Linux's abstract namespace). The peer sends
READY=1 once its API and migration listener accept connections, and STOPPING=1 when it
begins to stop its VMs; without $NOTIFY_SOCKET (not under systemd) it sends nothing.
The protocol is one sendto, so it is written here rather than taken from a library.

`unit` writes the service: Type=notify, KillMode=mixed (SIGTERM to the peer alone,
which stops its workers and their QEMUs itself; SIGKILL to the whole cgroup only after
TimeoutStopSec), restarts on failure (a restart cleans what a killed peer left:
roam.peer.statedir), and a state directory of mode 0700.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
from pathlib import Path

__all__ = ["NOTIFY_SOCKET", "notify", "unit"]

log = logging.getLogger("roam.peer")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
STOP_TIMEOUT = 90  # seconds: the peer stops every VM (each within 30 s) before it exits


def notify(state: str) -> bool:
    """Tell the service manager `state` (e.g. "READY=1"); whether there was one. A
    failure is logged, never raised: the service then looks as it would without it."""
    address = os.environ.get(NOTIFY_SOCKET)
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True


def roam_command() -> list[str]:
    """This installation's `roam`: its console script beside the interpreter, or the
    interpreter running roam's CLI module."""
    script = Path(sys.executable).parent / "roam"
    if os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "roam.cli.main"]


def unit(serve_args: list[str], description: str = "roam peer") -> str:
    """The unit file of a peer started as `roam peer serve SERVE_ARGS`."""
    exec_start = shlex.join([*roam_command(), "peer", "serve", *serve_args])
    return f"""\
[Unit]
Description={description}: runs this host's VMs and takes their migrations
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT}
Restart=on-failure
RestartSec=2
StateDirectory=roam
StateDirectoryMode=0700

[Install]
WantedBy=multi-user.target
"""
