"""Continuous sync of a running VM's devices to an object store (docs/SYNC.md).

The same dirty tracker that feeds a migration feeds the sync, each through a view of its
own (roam.storage.dirty): the migration's sink is a peer connection, the sync's an S3
bucket. Devices are cut into chunks of 1 MiB; each chunk that changed goes up as one
encrypted object named by a keyed hash of its content, and a manifest per sync point
names the object of every chunk.
"""
