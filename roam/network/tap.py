"""A tap device created by opening /dev/net/tun inside a VM's namespace.

The tap is not persistent: it lives as long as an open descriptor does. The peer creates
it, keeps one descriptor and gives QEMU another (`-netdev tap,fd=N`), so QEMU itself runs
in the host's namespace and needs no privileges, and a crash of both leaves no tap behind.
While QEMU is paused it does not read the descriptor, and the kernel queues the frames
that arrive (up to the device's txqueuelen) until the guest runs: the handover relies on it.
"""

from __future__ import annotations

import fcntl
import os
import struct

from roam.network import ns

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
QUEUE_LEN = 1000


def open_tap(netns: str, ifname: str) -> int:
    """Create tap `ifname` in namespace `netns`; returns its descriptor (close-on-exec)."""

    def create() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        return fd

    return ns.call_in(netns, create)
