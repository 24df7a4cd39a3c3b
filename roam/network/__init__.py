"""VM networking: a namespace per VM with a tap for QEMU, NAT and port forwards through the
host, and a per-VM VXLAN segment that lets a VM keep its address while it moves.

See docs/NETWORK.md for the layout and the functions the migration layer calls.
"""
