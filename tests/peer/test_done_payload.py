"""DONE's payload from a destination peer (Done): network input, fuzzed.

Whatever bytes arrive, parsing gives a Done and never fails a migration that completed;
a figure is kept only when it is a finite, non-negative number.
"""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from roam.peer.models import Done


@given(st.binary(max_size=512))
def test_any_bytes_parse_to_a_done(payload: bytes) -> None:
    done = Done.parse(payload)
    value = done.first_response_ms
    assert value is None or (math.isfinite(value) and value >= 0)


@given(st.one_of(st.none(), st.floats(min_value=0, max_value=1e9)))
def test_what_a_peer_sends_is_what_the_source_reads(value: float | None) -> None:
    assert Done.parse(Done(first_response_ms=value).model_dump_json().encode()
                      ).first_response_ms == value


@given(st.one_of(st.floats(max_value=-1e-9), st.just(math.inf), st.just(math.nan),
                 st.text(max_size=8), st.integers(0, 99).map(str),
                 st.lists(st.integers(), max_size=3)))
def test_a_bad_figure_says_nothing(value: object) -> None:
    payload = json.dumps({"first_response_ms": value}).encode()
    assert Done.parse(payload).first_response_ms is None


def test_an_empty_payload_from_an_older_peer() -> None:
    assert Done.parse(b"").first_response_ms is None
