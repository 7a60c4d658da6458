"""The committed gRPC stubs are exactly what `make proto` generates now."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generate = runpy.run_path(str(ROOT / "protos" / "generate.py"))["generate"]
    written = generate(tmp_path)
    assert written, "no stubs generated"
    committed = ROOT / "shared" / "rpc"
    stale = [
        str(path.relative_to(tmp_path))
        for path in written
        if not (committed / path.relative_to(tmp_path)).exists()
        or (committed / path.relative_to(tmp_path)).read_text() != path.read_text()
    ]
    extra = sorted(
        str(p.relative_to(committed))
        for p in (committed / "shoal" / "v1").glob("*_pb2*")
        if not (tmp_path / p.relative_to(committed)).exists()
    )
    assert not stale and not extra, f"stubs out of date, run `make proto`: {stale + extra}"


@pytest.mark.parametrize(
    ("ours", "generated"),
    [
        ("services.kvstore.server:KVStoreServicer", "shared.rpc.shoal.v1.kvstore_pb2_grpc:KVStoreServicer"),
        ("services.worker.server:WorkerServicer", "shared.rpc.shoal.v1.worker_pb2_grpc:WorkerServicer"),
    ],
)
def test_every_rpc_is_implemented(ours: str, generated: str) -> None:
    """The generated base answers UNIMPLEMENTED; every RPC of the contract must be overridden."""
    import importlib

    def load(spec: str) -> type:
        module, name = spec.split(":")
        cls: type = getattr(importlib.import_module(module), name)
        return cls

    ours_cls, base = load(ours), load(generated)
    rpcs = [name for name in vars(base) if name[0].isupper()]
    assert rpcs
    missing = [name for name in rpcs if getattr(ours_cls, name) is getattr(base, name)]
    assert not missing, f"{ours} leaves {missing} unimplemented"
