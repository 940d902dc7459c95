"""app/rpc's generated message and service modules are what grpc_tools.protoc makes of its .proto today.

The modules are generated once and kept in the tree (a release installs no code generator); this
regenerates them from app/rpc/grpc_predict_v2.proto and compares, so an edit of the .proto that was not
followed by a regeneration fails here. The generated modules are not imported in this process: their
messages take the protocol's names in protobuf's default pool, as tritonclient.grpc's do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("app/rpc/grpc_predict_v2.proto")
GENERATED = ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"]


def test_the_generated_modules_match_the_proto(tmp_path: Path):
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    run = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         str(PROTO)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for name in GENERATED:
        assert (tmp_path / PROTO.parent / name).read_text() == (ROOT / PROTO.parent / name).read_text(), (
            f"app/rpc/{name} is not what the .proto gives: regenerate it with the command in {PROTO}")


def test_the_service_is_the_protocols_with_its_six_rpcs():
    text = (ROOT / PROTO).read_text()
    assert "package inference;" in text and "service GRPCInferenceService {" in text
    rpcs = [line.split()[1].split("(")[0] for line in text.splitlines() if line.strip().startswith("rpc ")]
    assert rpcs == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
