"""Exposure: how the hypervisor sees engine devices (NBD exports, FUSE files)."""
