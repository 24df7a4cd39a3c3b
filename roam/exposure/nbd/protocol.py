"""NBD wire constants and the fixed-size structures of the protocol (proto.md, upstream nbd).

Only what roam speaks: fixed newstyle handshake, simple and structured replies,
base:allocation. Extended headers (64-bit lengths) are not negotiated.
"""

from __future__ import annotations

import struct
from typing import Final

from roam.errors import ErrorCode, RoamError

# Handshake.
NBDMAGIC: Final = 0x4E42444D41474943
IHAVEOPT: Final = 0x49484156454F5054
REPLY_MAGIC: Final = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
CLIENT_FLAGS_KNOWN: Final = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# Options.
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

# Option replies.
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

# Info items (NBD_OPT_INFO / NBD_OPT_GO).
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# Transmission flags.
TF_HAS_FLAGS: Final = 1 << 0
TF_READ_ONLY: Final = 1 << 1
TF_SEND_FLUSH: Final = 1 << 2
TF_SEND_FUA: Final = 1 << 3
TF_ROTATIONAL: Final = 1 << 4
TF_SEND_TRIM: Final = 1 << 5
TF_SEND_WRITE_ZEROES: Final = 1 << 6
TF_SEND_DF: Final = 1 << 7
TF_CAN_MULTI_CONN: Final = 1 << 8
TF_SEND_CACHE: Final = 1 << 10
TF_SEND_FAST_ZERO: Final = 1 << 11

# Requests.
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# Structured reply chunks.
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) | 2

# Errors (errno values fixed by the protocol, not the host's).
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

# Metadata context base:allocation.
META_BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

MAX_NAME: Final = 4096
"""Longest export name or metadata query accepted (the protocol's own limit)."""

# Fixed-size structures.
HANDSHAKE = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + offset (OFFSET_DATA)
EXTENT = struct.Struct(">II")  # length, status flags
EXPORT_INFO = struct.Struct(">HQH")  # INFO_EXPORT, size, transmission flags
BLOCK_SIZE_INFO = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, minimum, preferred, maximum


class ProtocolError(RoamError):
    """The peer broke the protocol; the connection cannot continue."""

    code = ErrorCode.BAD_REQUEST


class NBDError(RoamError):
    """A request failed with an NBD error code (an errno value from the list above)."""

    def __init__(self, errno: int, reason: str = "") -> None:
        super().__init__(f"NBD error {errno}" + (f": {reason}" if reason else ""))
        self.errno = errno
        self.reason = reason


class OptionError(RoamError):
    """The server refused an option during the handshake (no such export: not_found)."""

    code = ErrorCode.BAD_REQUEST

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        super().__init__(f"option {option} refused with {reply:#x}"
                         + (f": {message}" if message else ""),
                         code=ErrorCode.NOT_FOUND if reply == REP_ERR_UNKNOWN else None)
        self.option = option
        self.reply = reply


def pack_string(text: str) -> bytes:
    """A 32-bit length followed by UTF-8 bytes, as in export names and context queries."""
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


def unpack_string(data: bytes, pos: int) -> tuple[str, int]:
    """Read a length-prefixed string at `pos`; return it and the position after it."""
    if pos + 4 > len(data):
        raise ProtocolError("truncated string length")
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if n > MAX_NAME or pos + n > len(data):
        raise ProtocolError("string too long for its option")
    try:
        return data[pos : pos + n].decode(), pos + n
    except UnicodeDecodeError as e:
        raise ProtocolError("string is not UTF-8") from e
