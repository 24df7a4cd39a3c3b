"""Fixtures of the exposure tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.exposure.helpers import mounted


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """A mount point that is guaranteed unmounted afterwards, whatever the test did."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False)
        pytest.fail(f"{path} was left mounted")
