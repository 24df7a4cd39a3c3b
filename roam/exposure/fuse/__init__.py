"""Memory devices as files on a FUSE mount, for QEMU's memory-backend-file,share=on.

The guest's writes dirty the kernel's page cache; an fsync of the file makes the kernel
write exactly the dirty pages back to this daemon, which stores them in the provider.
"""

from roam.exposure.fuse.mount import FuseMount
from roam.exposure.fuse.tuning import Tuning

__all__ = ["FuseMount", "Tuning"]
