"""One blueprint per test session, built (or found) in the real cache, for every directory.

The cache is ~/.cache/roam unless ROAM_CACHE is set; CI points ROAM_CACHE at an empty
directory so that a broken build fails the suite.
"""

from __future__ import annotations

import logging
import time

import pytest

from roam.blueprint import Blueprint, build, cache_root


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: builds or boots a guest (still in the default run)")


@pytest.fixture(scope="session")
def blueprint() -> Blueprint:
    logging.getLogger("roam.blueprint").setLevel(logging.INFO)
    started = time.monotonic()
    built = build(cache=cache_root())
    print(f"\nblueprint {built.hash}: ready in {time.monotonic() - started:.1f} s")
    return built
