"""Spot notices: a watcher per cloud that polls its metadata service as documented, and
a fake metadata service that answers like all three (for tests and demos).

The node agent's API: `Watcher(WatchConfig(cloud, metadata=URL))`, iterated for
`Notice`s, `Watcher.acknowledge(notice)` once the node is ready to go. docs/SPOT.md says
what each cloud sends and how roam asks.
"""

from roam.spot.config import DEFAULT_METADATA, WatchConfig
from roam.spot.errors import (
    BadConfig,
    BadMetadata,
    MetadataError,
    MetadataUnavailable,
    TokenRejected,
)
from roam.spot.notice import Action, Cloud, Notice
from roam.spot.watcher import Watcher, WatchState, watch

__all__ = ["DEFAULT_METADATA", "Action", "BadConfig", "BadMetadata", "Cloud", "MetadataError",
           "MetadataUnavailable", "Notice", "TokenRejected", "WatchConfig", "WatchState",
           "Watcher", "watch"]
