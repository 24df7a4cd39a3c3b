#!/usr/bin/python3
"""PID 1 of the roam guest: mount, bring up the network, start services, reap zombies.

Debian's minbase variant has no init system and the guest needs only a few long-running
processes, so this small supervisor replaces one. Copied into the guest as /sbin/roam-init:
standard library only. Services come from /etc/roam/init.json (written by the blueprint
builder) and are restarted when they exit.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

CONFIG_PATH = "/etc/roam/init.json"
RESPAWN_DELAY = 1.0
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
# (source, target, type, options); /dev may already be there, moved over by the initramfs.
MOUNTS = [
    ("proc", "/proc", "proc", ""),
    ("sysfs", "/sys", "sysfs", ""),
    ("devtmpfs", "/dev", "devtmpfs", ""),
    ("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
    ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
    ("tmpfs", "/run", "tmpfs", "mode=755"),
    ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
]

_libc = ctypes.CDLL(None, use_errno=True)


def log(message: str) -> None:
    print(f"roam-init: {message}", flush=True)


def mount_all() -> None:
    for source, target, fstype, options in MOUNTS:
        if os.path.ismount(target):
            continue
        os.makedirs(target, exist_ok=True)
        if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0,
                       options.encode() or None) != 0:
            log(f"mount {target}: {os.strerror(ctypes.get_errno())}")


def kernel_args() -> dict[str, str]:
    args = {}
    for word in Path("/proc/cmdline").read_text().split():
        key, _, value = word.partition("=")
        args[key] = value
    return args


def run(*argv: str) -> None:
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"{' '.join(argv)}: {done.stderr.strip()}")


def network(args: dict[str, str]) -> None:
    """Loopback always; eth0 up if present, addressed from roam.ip= / roam.gw= if given."""
    run("ip", "link", "set", "lo", "up")
    if not Path("/sys/class/net/eth0").exists():
        return
    run("ip", "link", "set", "eth0", "up")
    if args.get("roam.ip"):
        run("ip", "addr", "add", args["roam.ip"], "dev", "eth0")
    if args.get("roam.gw"):
        run("ip", "route", "add", "default", "via", args["roam.gw"])


class Service:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.name: str = spec["name"]
        self.argv: list[str] = spec["argv"]
        self.user: str | None = spec.get("user")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        try:
            self.process = subprocess.Popen(self.argv, env=ENV, user=self.user,
                                            group=self.user, stdin=subprocess.DEVNULL)
        except OSError as exc:
            log(f"cannot start {self.name}: {exc}")
            return -1
        log(f"started {self.name} (pid {self.process.pid})")
        return self.process.pid


def supervise(services: list[Service]) -> None:
    """Reap every child (orphans are reparented to us); restart services that exit."""
    by_pid = {service.start(): service for service in services}
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(RESPAWN_DELAY)
            continue
        service = by_pid.pop(pid, None)
        if service is None or service.process is None:
            continue
        # Tell Popen we reaped it, or it would later waitpid() a pid that may be reused.
        service.process.returncode = os.waitstatus_to_exitcode(status)
        log(f"{service.name} exited ({service.process.returncode}); restarting")
        time.sleep(RESPAWN_DELAY)
        by_pid[service.start()] = service


def main() -> None:
    mount_all()
    config: dict[str, Any] = json.loads(Path(CONFIG_PATH).read_text())
    hostname = config.get("hostname", "roam")
    socket.sethostname(hostname)
    network(kernel_args())
    log(f"{hostname} up in {time.clock_gettime(time.CLOCK_BOOTTIME):.1f} s since boot")
    supervise([Service(spec) for spec in config.get("services", [])])


if __name__ == "__main__":
    main()
