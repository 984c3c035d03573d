"""The generated gRPC modules are committed; fail when they drift from the .proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "protos/featurebank/v1/featurebank.proto"
GENERATED = ["featurebank_pb2.py", "featurebank_pb2_grpc.py", "featurebank_pb2.pyi"]


def test_generated_modules_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--mypy_out={tmp_path}", PROTO],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        fresh = (tmp_path / "featurebank/v1" / name).read_text()
        committed = (ROOT / "featurebank/v1" / name).read_text()
        assert fresh == committed, f"{name} is out of date with {PROTO}: run `make protos`"


def test_generated_modules_import_and_describe_the_service() -> None:
    from featurebank.v1 import featurebank_pb2, featurebank_pb2_grpc

    assert featurebank_pb2.DESCRIPTOR.name == "featurebank/v1/featurebank.proto"
    service = featurebank_pb2.DESCRIPTOR.services_by_name["FeatureBank"]
    assert service.full_name == "featurebank.v1.FeatureBank"
    assert {m.name for m in service.methods} == {
        "Classify", "ClassifyBatch", "Search", "Embed", "Upsert", "SetLabels", "Delete",
        "RebuildIndex", "GetOperation", "GetInfo", "Suggest", "Audit", "GetThumbnails", "GetReport",
        "Quality", "CreateBank", "DropBank", "SetAlias",
        "SearchBatch", "Recommend", "Scroll", "Count", "SetMetadata", "ReplicaSnapshot", "FollowStore",
        "SetSplits", "KeepFinding",
    }
    assert service.methods_by_name["Upsert"].client_streaming
    assert hasattr(featurebank_pb2_grpc, "FeatureBankStub")
    inp = featurebank_pb2.Input(key="a")
    assert inp.WhichOneof("input") == "key"
