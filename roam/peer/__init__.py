"""The peer: one process per host that runs VMs and moves them to and from other peers."""
