"""Guest blueprints: a bootable OS (kernel, initramfs, root disk) built from Debian packages.

`build()` makes one from the host's configured apt sources and caches it by the hash of its
inputs; `Blueprint.load()` reads one back from a directory.
"""

from roam.blueprint.build import BuildOptions, build, cache_root
from roam.blueprint.spec import Blueprint, BlueprintError

__all__ = ["Blueprint", "BlueprintError", "BuildOptions", "build", "cache_root"]
