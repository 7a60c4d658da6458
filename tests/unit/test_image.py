"""The image holds everything its entrypoints import, checked in seconds without building it.

The entrypoints are the services' modules (`python -m services.<name>`), the
Celery worker and the `shoal` command (compose health checks run `shoal
probe`; the build runs `shoal tiny-model`). Every project module they can
import, at start-up or later inside a function, must be copied by the
Dockerfile and not excluded by .dockerignore; every third-party module must
come from a distribution pinned in requirements.lock (the only lock the image
installs). `make test-images` proves the same with a real build.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINTS = [
    "services.router.__main__",
    "services.worker.__main__",
    "services.kvstore.__main__",
    "services.controller.__main__",
    "services.controller.jobs.__main__",
    "cli.__main__",
    "cli.main",
]


def module_file(name: str) -> Path | None:
    """The project file of a module, or None when it is not the project's."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports anywhere (top level or inside functions), absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # submodules imported by name
    return found


def reachable() -> tuple[dict[str, Path], set[str]]:
    """Project modules reachable from the entrypoints (with their parent packages), and the
    top-level names of third-party modules they import."""
    project: dict[str, Path] = {}
    third_party: set[str] = set()
    pending = list(ENTRYPOINTS)
    while pending:
        name = pending.pop()
        if name in project:
            continue
        path = module_file(name)
        if path is None:
            top = name.partition(".")[0]
            if module_file(top) is None and top not in sys.stdlib_module_names:
                third_party.add(top)
            continue
        project[name] = path
        parent = name.rpartition(".")[0]
        pending.extend([parent] if parent else [])
        pending.extend(imports_of(path, name))
    return project, third_party


def copied_sources() -> list[str]:
    """Context paths the Dockerfile's build stage copies."""
    sources: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources.extend(w.rstrip("/") for w in words[1:-1] if not w.startswith("--"))
    return sources


def in_context(relative: str) -> bool:
    """Whether .dockerignore keeps this path in the build context (the last matching rule wins)."""
    kept = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.removeprefix("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            kept = negate
    return kept


def test_every_module_an_entrypoint_imports_is_in_the_build_context() -> None:
    project, _ = reachable()
    assert "simulator" in {name.partition(".")[0] for name in project}, "the walk no longer reaches the simulator"
    copied = copied_sources()
    missing = []
    for name, path in sorted(project.items()):
        relative = path.relative_to(ROOT).as_posix()
        if not any(relative == c or relative.startswith(f"{c}/") for c in copied) or not in_context(relative):
            missing.append(f"{name} ({relative})")
    assert not missing, "imported by an entrypoint but not in the image: " + ", ".join(missing)


def test_every_third_party_module_comes_from_the_runtime_lock() -> None:
    _, third_party = reachable()
    locked = {
        canonicalize_name(Requirement(line).name)
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    providers = metadata.packages_distributions()
    missing = {
        module: providers.get(module, ["(no installed distribution)"])
        for module in third_party
        if not any(canonicalize_name(d) in locked for d in providers.get(module, []))
    }
    assert not missing, f"imported by an entrypoint but not pinned in requirements.lock: {missing}"


@pytest.mark.parametrize(
    ("path", "kept"),
    [("shared/hashing.py", True), ("simulator/cluster.py", True), ("tests/conftest.py", False),
     ("shared/__pycache__/x.pyc", False), ("requirements-dev.lock", False)],
)  # fmt: skip
def test_the_dockerignore_reading_matches_docker_rules(path: str, kept: bool) -> None:
    assert in_context(path) is kept
