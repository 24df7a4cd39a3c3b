"""roam: run ordinary Linux VMs anywhere and live-migrate them between hosts."""

__version__ = "0.1.0"
