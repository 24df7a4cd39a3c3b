"""NBD exposure: a server that serves any storage provider, and a client."""

from roam.exposure.nbd.client import NBDAddress, NBDClient
from roam.exposure.nbd.server import Export, NBDServer

__all__ = ["Export", "NBDAddress", "NBDClient", "NBDServer"]
