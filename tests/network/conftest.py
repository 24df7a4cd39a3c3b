"""Fixtures: a lab of namespaces (see lab.py), removed even when a test fails."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.network.lab import FakeGuest, Lab, lab


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")


@pytest.fixture
def net_lab() -> Iterator[Lab]:
    with lab("a", "b", "c", "k") as the_lab:  # three hosts and a client
        yield the_lab


@pytest.fixture
def guest(net_lab: Lab) -> Iterator[FakeGuest]:
    fake = FakeGuest(f"{net_lab.tag}g")
    try:
        yield fake
    finally:
        fake.close()
