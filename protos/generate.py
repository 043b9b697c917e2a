"""Regenerate clients/badged_proto from protos/ (run: python protos/generate.py).

The directory under ``-I protos`` becomes the Python import path, so
``protos/badged_proto/v1/x.proto`` yields ``badged_proto.v1.x_pb2``.
``tests/unit/test_protos_current.py`` regenerates into a temp dir and fails
when the committed code differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    bindir = Path(sys.executable).parent
    args = [
        "protoc", f"-I{ROOT / 'protos'}", f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}", f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for pkg in {out_dir / Path(p).parent for p in protos} | {out_dir / "badged_proto"}:
        (pkg / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "clients")
