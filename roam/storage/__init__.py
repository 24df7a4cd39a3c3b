"""Storage engine: a device is a chain of providers, a source with modules stacked on it.

Every provider has the same five members (see `provider.Provider`); a module wraps another
provider and adds one feature. Compose them, don't subclass them.
"""

from roam.storage.provider import DEFAULT_BLOCK_SIZE, Buffer, Provider, StorageError

__all__ = ["DEFAULT_BLOCK_SIZE", "Buffer", "Provider", "StorageError"]
