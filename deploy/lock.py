"""Write the two lock files from the current virtualenv: what runs, and what develops.

`requirements.lock` pins the closure of the project's runtime dependencies
(pyproject's `dependencies`): it is all the image installs. `requirements-dev.lock`
pins everything else installed for development (tests, linters, stub
generators). A dependency whose environment marker is false here (redis-py's
`async-timeout` on Python < 3.11.3, say) is not installed, so it keeps the
pin and marker it has in the current lock: the lock must serve the Pythons the
image may run on, not only this one.

Usage: python deploy/lock.py [ROOT]   (`make lock` runs it)
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Set as AbstractSet
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The project itself, the installer's own tools and a benchmark's peer (`make mooncake-te` installs it for
# bench-kvstore only) are never pinned here.
UNPINNED = {"shoal", "pip", "setuptools", "wheel", "mooncake-transfer-engine-non-cuda"}

HEADER = {
    "requirements.lock": (
        "# Runtime pins: the closure of pyproject's dependencies (the image installs only these).\n"
        "# Regenerate with 'make lock' after changing dependencies in pyproject.toml.\n"
        "# torch is the CPU build that pip finds locally; a CUDA image overrides it (see Dockerfile).\n"
    ),
    "requirements-dev.lock": (
        "# Development pins (tests, linters, stub generators), installed by 'make venv' beside\n"
        "# requirements.lock. Regenerate with 'make lock'.\n"
    ),
}


def runtime_closure(roots: list[str]) -> tuple[set[str], list[Requirement]]:
    """Installed distributions the root requirements need (by canonical name), and the
    requirements skipped because their marker is false in this environment."""
    needed: set[str] = set()
    skipped: list[Requirement] = []
    pending = [Requirement(spec) for spec in roots]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            skipped.append(requirement)
            continue
        if name in needed:
            continue
        needed.add(name)
        for extra in requirement.extras:
            pending.extend(_requires(name, extra))
        pending.extend(_requires(name, ""))
    return needed, skipped


def _requires(name: str, extra: str) -> list[Requirement]:
    out = []
    for spec in metadata.requires(name) or []:
        requirement = Requirement(spec)
        marker = requirement.marker
        if extra:
            if marker is None or not marker.evaluate({"extra": extra}):
                continue
            requirement.marker = None  # the extra was asked for: keep what it adds unconditionally
        elif marker is not None and "extra" in str(marker):
            continue
        out.append(requirement)
    return out


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in UNPINNED:
            pins[name] = f"{dist.metadata['Name']}=={dist.version}"
    return pins


def _name(line: str) -> str:
    return canonicalize_name(Requirement(line).name)


def _kept_lines(lock: Path, names: AbstractSet[str]) -> list[str]:
    """Lines of an existing lock for packages with a marker (not installed here)."""
    if not lock.is_file():
        return []
    kept = []
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#") and ";" in line and _name(line) in names:
            kept.append(line)
    return kept


def main(root: Path) -> None:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    needed, skipped = runtime_closure(list(project["dependencies"]))
    pins = _pins()
    needed -= UNPINNED  # torch names setuptools, which the venv's installer brings
    missing = needed - set(pins)
    if missing:
        sys.exit(f"not installed in this venv: {', '.join(sorted(missing))}; run `make venv` first")
    runtime_lock = root / "requirements.lock"
    marked = {canonicalize_name(r.name) for r in skipped} - needed
    runtime = sorted([pins[n] for n in needed] + _kept_lines(runtime_lock, marked), key=_name)
    dev = sorted((pins[n] for n in set(pins) - needed), key=_name)
    runtime_lock.write_text(HEADER["requirements.lock"] + "\n".join(runtime) + "\n")
    (root / "requirements-dev.lock").write_text(HEADER["requirements-dev.lock"] + "\n".join(dev) + "\n")
    print(f"requirements.lock: {len(runtime)} pins; requirements-dev.lock: {len(dev)} pins")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
