"""Building the image and running docker-compose, with Docker or with podman.

`make test-images` uses these: with a Docker engine that answers it drives
`docker` and `docker compose`; otherwise podman (set up by
deploy/container-host.sh) and podman-compose. Where no registry can be
reached, the base image is built locally: `debootstrap --variant=minbase` of
Debian bookworm with Python, imported into the engine. The image build sees
this machine's pip configuration (its index mirrors, local wheel folders and
CA bundle are mounted read-only into the build under the same paths), so it
installs what `make venv` installs here. Podman keeps built images and layers
between runs: the base and the pip layer are built once per machine.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
BASE_TAG = "localhost/shoal-base:bookworm"
REDIS_TAG = "localhost/shoal-redis:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def _run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class Engine:
    """A container engine's command line: `docker` or `podman`, and its compose."""

    name: str

    @classmethod
    def detect(cls) -> Engine:
        docker = shutil.which("docker")
        if docker and subprocess.run([docker, "info"], check=False, capture_output=True).returncode == 0:
            return cls("docker")
        if shutil.which("podman"):
            return cls("podman")
        raise RuntimeError("no container engine: run deploy/container-host.sh (make test-images does)")

    def __call__(self, *args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.name, *args], check=check, text=True, capture_output=capture)

    def image_id(self, tag: str) -> str | None:
        found = self("image", "inspect", "--format", "{{.Id}}", tag, capture=True, check=False)
        return found.stdout.strip() if found.returncode == 0 else None

    def has_image(self, tag: str) -> bool:
        return self.image_id(tag) is not None

    def compose(self) -> list[str]:
        if self.name == "docker":
            return ["docker", "compose"]
        return [str(Path(sys.executable).with_name("podman-compose"))]

    def build_options(self) -> list[str]:
        """What a build needs from this machine: its pip configuration (podman only; Docker
        builds reach the public indexes themselves)."""
        return [] if self.name == "docker" else _pip_mounts()


def _pip_mounts() -> list[str]:
    """`-v` options that give a build this machine's effective pip configuration.

    The configuration (files and PIP_* variables alike, as `pip config list`
    reports it) is written to one pip.conf mounted at /etc/pip.conf, and every
    local path it names (wheel folders, file:// indexes, constraints, the CA
    bundle) is mounted at the same path.
    """
    listed = _run([sys.executable, "-m", "pip", "config", "list"], capture_output=True).stdout
    config = configparser.ConfigParser()
    config.add_section("global")
    paths: set[Path] = set()
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        value = value.strip().strip("'\"")
        if not name or not value:
            continue
        config.set("global", name, value)
        for word in value.split():
            path = Path(urlparse(word).path) if word.startswith("file://") else Path(word)
            if path.name == "simple":
                path = path.parent  # a file:// index links to files beside its simple/ folder
            if path.is_absolute() and path.exists():
                paths.add(path)
    conf = Path(tempfile.mkdtemp(prefix="shoal-pip-")) / "pip.conf"
    with conf.open("w") as out:
        config.write(out)
    mounts = [f"{conf}:/etc/pip.conf:ro"] + [f"{p}:{p}:ro" for p in sorted(paths)]
    return [arg for mount in mounts for arg in ("-v", mount)]


def _debootstrap(target: Path, packages: Sequence[str]) -> None:
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            "bookworm",
            str(target),
            DEBIAN_MIRROR,
        ],
        capture_output=True,
    )
    for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (target / leftovers).glob("*"):
            if item.is_file():
                item.unlink()


def _import(engine: Engine, root: Path, tag: str, cmd: str) -> None:
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    _run([engine.name, "import", "--change", f"CMD {cmd}", "-", tag], stdin=tar.stdout, capture_output=True)
    if tar.wait() != 0:
        raise RuntimeError(f"tar of {root} failed")


def local_images(engine: Engine) -> None:
    """The base image (Debian + Python) and a Redis image, from Debian's packages, once per machine."""
    wanted = {
        BASE_TAG: (["python3", "python3-venv", "ca-certificates"], '["python3"]'),
        REDIS_TAG: (["redis-server"], '["redis-server", "--protected-mode", "no"]'),
    }
    for tag, (packages, cmd) in wanted.items():
        if engine.has_image(tag):
            continue
        with tempfile.TemporaryDirectory(prefix="shoal-rootfs-") as tmp:
            _debootstrap(Path(tmp) / "root", packages)
            _import(engine, Path(tmp) / "root", tag, cmd)


def build_image(engine: Engine, tag: str, base: str | None) -> None:
    """Build the image as `tag`, then remove the image the tag named before.

    Every build of changed sources leaves a new ~1.7 GB layer (the venv copied into the
    runtime stage); without the removal, the superseded images of repeated runs fill the
    disk until a build fails for want of space.
    """
    before = engine.image_id(tag)
    args = ["build", "-t", tag, *engine.build_options()]
    if base is not None:
        # The pinned CPU torch is on this machine's pip indexes, not PyTorch's own.
        args += ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_INDEX=https://pypi.org/simple"]
    engine(*args, str(ROOT))
    if before is not None and before != engine.image_id(tag):
        # A container still using the old image keeps it; that is not this build's failure.
        engine("rmi", before, capture=True, check=False)


@dataclass
class ComposeStack:
    """A docker-compose project brought up by `up` and removed whole by `down`."""

    engine: Engine
    project: str
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self.engine.compose(), "-p", self.project, "-f", str(ROOT / "docker-compose.yml"), *args]
        return subprocess.run(argv, check=check, text=True, capture_output=True, env={**os.environ, **self.env})

    def containers(self) -> dict[str, str]:
        """Compose service name -> container name, for this project's containers."""
        listed = self.engine(
            "ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
            "--format", '{{.Names}} {{index .Labels "com.docker.compose.service"}}',
            capture=True,
        ).stdout  # fmt: skip
        pairs = (line.split() for line in listed.splitlines() if line.strip())
        return {service: name for name, service in pairs}

    def healthy(self, container: str) -> bool:
        """Run the container's own health check (podman-compose does not run them by itself)."""
        if self.engine.name == "podman":
            return self.engine("healthcheck", "run", container, capture=True, check=False).returncode == 0
        status = self.engine("inspect", "-f", "{{.State.Health.Status}}", container, capture=True, check=False)
        return status.stdout.strip() == "healthy"

    def wait_healthy(self, services: Sequence[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(services)
        while waiting:
            names = self.containers()
            waiting = {s for s in waiting if s not in names or not self.healthy(names[s])}
            if not waiting:
                return
            if time.monotonic() > deadline:
                logs = {s: self.logs(s)[-2000:] for s in waiting}
                raise TimeoutError(f"not healthy after {timeout_s:.0f}s: {sorted(waiting)}; logs: {logs}")
            time.sleep(2)

    def logs(self, service: str) -> str:
        name = self.containers().get(service)
        if name is None:
            return "(no container)"
        out = self.engine("logs", name, capture=True, check=False)
        return out.stdout + out.stderr

    def down(self) -> None:
        self.run("down", "-v", "-t", "10", check=False)
        # Whatever compose left behind (a failed `up` can leave containers that `down` does not list).
        label = f"label=com.docker.compose.project={self.project}"
        leftovers = list(self.containers().values())
        if leftovers:
            dependents = ["--depend"] if self.engine.name == "podman" else []
            self.engine("rm", "-f", "-v", *dependents, *leftovers, capture=True, check=False)
        volumes = self.engine("volume", "ls", "-q", "--filter", label, capture=True, check=False).stdout.split()
        if volumes:
            self.engine("volume", "rm", "-f", *volumes, capture=True, check=False)
        self.engine("network", "rm", "-f", f"{self.project}_default", capture=True, check=False)


@contextmanager
def compose_stack(engine: Engine, project: str, services: Sequence[str], env: dict[str, str]) -> Iterator[ComposeStack]:
    stack = ComposeStack(engine, project, env)
    stack.down()  # a previous run killed before its teardown
    try:
        stack.run("up", "-d", "--no-build", *services)
        yield stack
    finally:
        stack.down()
