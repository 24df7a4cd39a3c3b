"""Hypervisors behind one interface: `driver(name)` gives a Driver, whose machines run
guests on engine devices. See roam.hypervisor.driver for the contract."""

from roam.hypervisor.driver import (
    Capabilities,
    Driver,
    HypervisorError,
    Machine,
    MachineExited,
    MachineSpec,
    MemoryFeeder,
    Nic,
    UnknownDriver,
)
from roam.hypervisor.factory import driver

__all__ = ["Capabilities", "Driver", "HypervisorError", "Machine", "MachineExited",
           "MachineSpec", "MemoryFeeder", "Nic", "UnknownDriver", "driver"]
