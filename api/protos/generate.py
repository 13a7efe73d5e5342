"""Regenerate the committed *_pb2.py / *_pb2_grpc.py files from the .proto files.

Runs protoc (from grpcio-tools) from the repository root with ``-I .`` so the
generated imports read ``from api.protos... import ...``. The freshness test in
tests/unit/test_protos_fresh.py calls :func:`generate` into a temporary folder
and compares, so this is the one place the command lives.

Usage: python -m api.protos.generate [OUTPUT_ROOT]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def proto_files() -> list[str]:
    """Every .proto under api/protos, relative to the repository root, sorted."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "api" / "protos").rglob("*.proto"))


def generate(out_root: Path) -> None:
    """Write generated Python modules for every proto file below ``out_root``."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        "-I.",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *proto_files(),
    ]
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
