"""The one place that knows which drivers exist: runner, snapshotter and peer ask here.

To add a driver (Firecracker, Cloud Hypervisor): implement roam.hypervisor.driver's
Driver and Machine in a folder of its own beside `qemu/` and add it to `_DRIVERS`. No
Firecracker binary is obtainable on the machines this project is built and tested on, so
QEMU is the only entry today.
"""

from __future__ import annotations

from collections.abc import Callable

from roam.hypervisor.driver import Driver, UnknownDriver
from roam.hypervisor.qemu import QemuDriver

DEFAULT = "qemu"

_DRIVERS: dict[str, Callable[[], Driver]] = {"qemu": QemuDriver}


def driver(name: str = DEFAULT) -> Driver:
    """The driver called `name`; UnknownDriver if this build has none by that name."""
    try:
        make = _DRIVERS[name]
    except KeyError:
        raise UnknownDriver(f"no hypervisor driver {name!r} in this build "
                            f"(available: {', '.join(sorted(_DRIVERS))})") from None
    return make()


def names() -> list[str]:
    return sorted(_DRIVERS)
