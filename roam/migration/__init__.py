"""Migration: move a device group between hosts while it is being written.

wire.py is the message format (docs/PROTOCOL.md), channel.py the transports,
source.py and destination.py the two ends.
"""
