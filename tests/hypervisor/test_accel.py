"""The accelerator is chosen by booting the guest kernel under KVM, not by guessing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from roam.blueprint import Blueprint
from roam.errors import RoamError
from roam.hypervisor import accel


def test_choice_comes_from_a_test_boot_and_is_remembered(
        blueprint: Blueprint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("ROAM_ACCEL", raising=False)
    caplog.set_level(logging.INFO, logger="roam.hypervisor")
    first = accel.choose_accel(blueprint.kernel, blueprint.initramfs, tmp_path)
    assert first.name in ("kvm", "tcg")
    assert f"accelerator: {first.name}" in caplog.text
    if accel.kvm_usable() is not None:
        assert first.name == "tcg"  # no KVM at all: nothing was booted
        return
    entries = list((tmp_path / "accel").glob("*.json"))
    assert len(entries) == 1
    boots = json.loads(entries[0].read_text())["kvm_boots"]
    assert (first.name == "kvm") == boots
    assert "test boot" in caplog.text
    caplog.clear()
    again = accel.choose_accel(blueprint.kernel, blueprint.initramfs, tmp_path)
    assert again == first and "test boot" not in caplog.text  # answered from the cache


def test_roam_accel_overrides(blueprint: Blueprint, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROAM_ACCEL", "tcg")
    assert accel.choose_accel(blueprint.kernel, blueprint.initramfs, tmp_path) == accel.Accel(
        "tcg", "ROAM_ACCEL")
    monkeypatch.setenv("ROAM_ACCEL", "fast")
    with pytest.raises(RoamError, match="expected kvm, tcg or auto"):
        accel.choose_accel(blueprint.kernel, blueprint.initramfs, tmp_path)
