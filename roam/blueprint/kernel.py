"""The Debian kernel and busybox-static: resolved and fetched through the host's apt."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from roam.blueprint.spec import BlueprintError
from roam.blueprint.tools import run, which

log = logging.getLogger("roam.blueprint")

KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"


def _field(stanza: str, name: str) -> str | None:
    match = re.search(rf"^{name}: (.*)$", stanza, re.MULTILINE)
    return match.group(1).strip() if match else None


def _show(name: str) -> str | None:
    done = subprocess.run([which("apt-cache"), "show", "--no-all-versions", name],
                          capture_output=True, text=True)
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def _stanza(name: str) -> str:
    """apt's record for name's candidate version; runs `apt-get update` if apt knows nothing."""
    stanza = _show(name)
    if stanza is None:
        if os.geteuid() != 0:
            raise BlueprintError(f"apt does not know {name}: run `apt-get update` as root")
        log.info("apt has no package lists for %s: running apt-get update", name)
        run(["apt-get", "update", "-qq"])
        stanza = _show(name)
        if stanza is None:
            raise BlueprintError(f"no apt source provides {name} (check /etc/apt/sources*)")
    return stanza


def candidate(name: str) -> DebPackage:
    """The version of name that apt would install now."""
    version = _field(_stanza(name), "Version")
    if version is None:
        raise BlueprintError(f"apt-cache show {name}: no Version field")
    return DebPackage(name, version)


def kernel_package() -> DebPackage:
    """The versioned linux-image-6.1.0-*-amd64 package that linux-image-amd64 depends on."""
    depends = _field(_stanza(KERNEL_META), "Depends") or ""
    match = re.match(r"(linux-image-[^\s,(]+)", depends)
    if match is None:
        raise BlueprintError(f"{KERNEL_META} depends on {depends!r}: no kernel image found")
    return candidate(match.group(1))


def fetch(packages: list[DebPackage], workdir: Path) -> dict[str, Path]:
    """Download the .debs with `apt-get download` and unpack each into its own tree."""
    log.info("downloading %s", ", ".join(p.spec for p in packages))
    try:
        run(["apt-get", "download", "-q", *(p.spec for p in packages)], cwd=workdir)
    except BlueprintError as exc:
        raise BlueprintError(f"{exc}\n(if the mirror no longer has these versions, the "
                             "package lists are stale: run `apt-get update`)") from exc
    trees = {}
    for package in packages:
        debs = list(workdir.glob(f"{package.name}_*.deb"))
        if len(debs) != 1:
            raise BlueprintError(f"apt-get download left {len(debs)} files for {package.name}")
        tree = workdir / package.name
        run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        debs[0].unlink()
        trees[package.name] = tree
    return trees


def kernel_release(kernel_tree: Path) -> str:
    releases = [p.name for p in (kernel_tree / "lib" / "modules").iterdir()]
    if len(releases) != 1:
        raise BlueprintError(f"expected one kernel release in the package, found {releases}")
    return releases[0]


def module_load_order(kernel_tree: Path, busybox: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files to load, dependencies first: depmod the tree, then follow modules.dep."""
    release = kernel_release(kernel_tree)
    run([str(busybox), "depmod", "-b", str(kernel_tree), release])
    moddir = kernel_tree / "lib" / "modules" / release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        module, _, requires = line.partition(":")
        deps[module] = requires.split()
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        for dependency in deps.get(module, []):
            visit(dependency)
        order.append(module)

    for name in wanted:
        if name not in by_name:
            raise BlueprintError(f"kernel {release} has no module {name}")
        visit(by_name[name])
    return [moddir / m for m in order]
