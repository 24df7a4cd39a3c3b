"""What etcd's v3 JSON gateway answers, as pydantic models parsed defensively.

The gateway (grpc-gateway over etcd's gRPC API, under /v3/) writes protobuf's JSON
mapping: 64-bit integers are strings ("revision": "5"), bytes are base64, and a field at
its zero value (0, false, empty, the first enum member) is left out. So every field here
has its zero as default, integers accept strings, and bytes are checked base64. Unknown
fields are ignored (a newer etcd adds some); a field of the wrong shape fails the parse,
and the client turns that into one `BadResponse`.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "DeleteRangeResponse",
    "Event",
    "EventType",
    "GatewayError",
    "Header",
    "KeepAliveMessage",
    "KeyValue",
    "LeaseGrantResponse",
    "LeaseKeepAliveResponse",
    "LeaseRevokeResponse",
    "PutResponse",
    "RangeResponse",
    "ResponseOp",
    "StatusResponse",
    "StreamError",
    "TxnResponse",
    "WatchMessage",
    "WatchResponse",
    "b64",
]

INT64_MAX = 2**63 - 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("bytes are base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


B64 = Annotated[bytes, BeforeValidator(_unb64)]
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
UInt64 = Annotated[int, Field(ge=0, le=2**64 - 1)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Header(Wire):
    cluster_id: UInt64 = 0
    member_id: UInt64 = 0
    revision: Int64 = 0
    raft_term: UInt64 = 0


class KeyValue(Wire):
    key: B64 = b""
    create_revision: Int64 = 0
    mod_revision: Int64 = 0
    version: Int64 = 0
    value: B64 = b""
    lease: Int64 = 0


class RangeResponse(Wire):
    header: Header = Header()
    kvs: list[KeyValue] = []
    more: bool = False
    count: Int64 = 0


class PutResponse(Wire):
    header: Header = Header()
    prev_kv: KeyValue | None = None


class DeleteRangeResponse(Wire):
    header: Header = Header()
    deleted: Int64 = 0
    prev_kvs: list[KeyValue] = []


class ResponseOp(Wire):
    response_range: RangeResponse | None = None
    response_put: PutResponse | None = None
    response_delete_range: DeleteRangeResponse | None = None


class TxnResponse(Wire):
    header: Header = Header()
    succeeded: bool = False
    responses: list[ResponseOp] = []


class LeaseGrantResponse(Wire):
    header: Header = Header()
    id: Int64 = Field(0, alias="ID")
    ttl: Int64 = Field(0, alias="TTL")
    error: str = ""


class LeaseKeepAliveResponse(Wire):
    """TTL 0 (left out) means the lease is gone."""

    header: Header = Header()
    id: Int64 = Field(0, alias="ID")
    ttl: Int64 = Field(0, alias="TTL")


class LeaseRevokeResponse(Wire):
    header: Header = Header()


class StatusResponse(Wire):
    """A member's view: `leader` is 0 (left out) while it knows no leader, and `errors`
    then says why ("etcdserver: no leader")."""

    header: Header = Header()
    version: str = ""
    leader: UInt64 = 0
    raft_term: UInt64 = Field(0, alias="raftTerm")
    errors: list[str] = []


class EventType(enum.StrEnum):
    PUT = "PUT"
    DELETE = "DELETE"


class Event(Wire):
    type: EventType = EventType.PUT
    kv: KeyValue = KeyValue()
    prev_kv: KeyValue | None = None


class WatchResponse(Wire):
    header: Header = Header()
    watch_id: Int64 = 0
    created: bool = False
    canceled: bool = False
    compact_revision: Int64 = 0
    cancel_reason: str = ""
    fragment: bool = False
    events: list[Event] = []


class StreamError(Wire):
    """An error in a streamed answer (the watch, the keepalive)."""

    grpc_code: int = 0
    http_code: int = 0
    message: str = ""


class WatchMessage(Wire):
    """One line of the watch stream: a result or an error."""

    result: WatchResponse | None = None
    error: StreamError | None = None


class KeepAliveMessage(Wire):
    result: LeaseKeepAliveResponse | None = None
    error: StreamError | None = None


class GatewayError(Wire):
    """A failed unary call's body: the gRPC code and etcd's message."""

    error: str = ""
    message: str = ""
    code: int = 0
