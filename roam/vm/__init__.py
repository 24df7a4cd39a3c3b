"""Running guests under QEMU."""
