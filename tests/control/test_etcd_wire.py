"""etcd's gateway answers are parsed defensively: anything at all gives a model or one
BadResponse, and real-shaped answers (64-bit integers as strings, base64 bytes, zero
fields left out) parse to what they say."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roam.control.etcd import wire
from roam.control.etcd.client import parse
from roam.control.etcd.errors import BadResponse

MODELS: list[type[wire.Wire]] = [
    wire.RangeResponse, wire.PutResponse, wire.DeleteRangeResponse, wire.TxnResponse,
    wire.LeaseGrantResponse, wire.KeepAliveMessage, wire.StatusResponse, wire.WatchMessage,
    wire.GatewayError]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
fields = st.sampled_from(["header", "kvs", "key", "value", "revision", "events", "result",
                          "error", "ID", "TTL", "succeeded", "responses", "kv", "type",
                          "mod_revision", "canceled", "compact_revision", "leader"])
shaped = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(fields, inner, max_size=5),
    max_leaves=25)


def _parses_or_bad(model: type[wire.Wire], text: bytes | str) -> None:
    try:
        parse(model, text)
    except BadResponse as exc:
        assert "\n" not in exc.message


@given(st.sampled_from(MODELS), st.binary(max_size=200))
def test_any_bytes(model: type[wire.Wire], data: bytes) -> None:
    _parses_or_bad(model, data)


@given(st.sampled_from(MODELS), json_values | shaped)
def test_any_json(model: type[wire.Wire], value: Any) -> None:
    _parses_or_bad(model, json.dumps(value))


int64s = st.integers(min_value=0, max_value=2**63 - 1)


@given(st.binary(max_size=40), st.binary(max_size=40), int64s, int64s, int64s, int64s,
       st.booleans())
def test_real_shaped_answers(key: bytes, value: bytes, created: int, modified: int,
                             version: int, lease: int, delete: bool) -> None:
    kv: dict[str, Any] = {"key": base64.b64encode(key).decode(),
                          "create_revision": str(created), "mod_revision": str(modified),
                          "version": str(version), "lease": str(lease)}
    if value:
        kv["value"] = base64.b64encode(value).decode()
    event: dict[str, Any] = {"kv": kv}
    if delete:
        event["type"] = "DELETE"
    line = json.dumps({"result": {"header": {"revision": str(modified)}, "events": [event]}})
    message = parse(wire.WatchMessage, line)
    assert message.result is not None
    (got,) = message.result.events
    assert got.type == (wire.EventType.DELETE if delete else wire.EventType.PUT)
    assert (got.kv.key, got.kv.value, got.kv.create_revision, got.kv.mod_revision,
            got.kv.version, got.kv.lease) == (key, value, created, modified, version, lease)
    assert parse(wire.RangeResponse, json.dumps({"kvs": [kv], "count": "1"})).kvs == [got.kv]


def test_zero_fields_left_out_and_unknown_fields_ignored() -> None:
    answer = parse(wire.TxnResponse, '{"header": {"revision": "7", "new": 1}, "x": []}')
    assert (answer.header.revision, answer.succeeded, answer.responses) == (7, False, [])
    assert parse(wire.KeepAliveMessage, '{"result": {"ID": "12"}}').result == \
        wire.LeaseKeepAliveResponse.model_validate({"ID": "12"})


@pytest.mark.parametrize(("model", "text"), [
    (wire.RangeResponse, '{"kvs": [{"key": "not base64!"}]}'),
    (wire.RangeResponse, '{"header": {"revision": "x"}}'),
    (wire.RangeResponse, '{"header": {"revision": "99999999999999999999"}}'),
    (wire.WatchMessage, '{"result": {"events": [{"type": "MOVE"}]}}'),
    (wire.StatusResponse, "[]"),
    (wire.StatusResponse, "<html>")])
def test_wrong_shapes_are_bad_responses(model: type[wire.Wire], text: str) -> None:
    with pytest.raises(BadResponse, match="does not parse"):
        parse(model, text)
