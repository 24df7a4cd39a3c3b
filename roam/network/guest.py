"""The guest's end of every VM network: the address eth0 has and its gateway.

Every VM sits alone behind a namespace of its own (vmnet.py), so every guest can have the
same address: a package then resumes on any host, under any network role, without its
guest reconfiguring anything. The network layer owns these addresses; the VM layer only
passes `KERNEL_ARGS` on the guest's kernel command line, where roam-init reads them.
"""

from __future__ import annotations

import ipaddress

GUEST = ipaddress.IPv4Interface("10.0.2.15/24")
GATEWAY = ipaddress.IPv4Interface("10.0.2.2/24")
KERNEL_ARGS = f"roam.ip={GUEST} roam.gw={GATEWAY.ip}"
"""Kernel arguments that address eth0 (roam-init reads them; baked into each snapshot)."""
