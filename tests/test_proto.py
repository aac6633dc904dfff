"""The generated modules must match proto/ exactly: regenerate and compare."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(REPO / "scripts/gen_proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    generated = sorted((tmp_path / "lmlink/v1").glob("*.py*"))
    assert generated, "protoc produced nothing"
    for fresh in generated:
        committed = REPO / "lmlink/v1" / fresh.name
        assert committed.exists(), f"{fresh.name} is generated but not committed"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"lmlink/v1/{fresh.name} drifted from proto/; run scripts/gen_proto.sh"
        )


def test_service_surface():
    from lmlink.v1 import inference_pb2

    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "ListModels", "GetServerInfo", "Cancel", "LoadModel", "UnloadModel", "Resume"}
    assert methods["LoadModel"].server_streaming and not methods["UnloadModel"].server_streaming
    assert methods["Resume"].server_streaming and methods["Resume"].output_type.name == "GenerateEvent"
    assert methods["Generate"].server_streaming
