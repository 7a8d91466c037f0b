#!/usr/bin/env python3
"""Regenerates the gRPC stubs in ``src/backstop/_proto`` from ``proto/backstop/v1``.

    python clients/python/scripts/gen_stubs.py           # rewrite the stubs
    python clients/python/scripts/gen_stubs.py --check   # exit 1 if they are stale

The stubs are generated with one pinned ``grpcio-tools`` (``GENERATOR`` below)
so that regenerating is byte-for-byte reproducible: the staleness test runs
``--check``, and a different generator version would show as a diff even with
unchanged protos. The pin is deliberately old: its gencode (protobuf 5.27)
loads on every protobuf runtime from 5.27 to 7.x and on Python 3.9, while
newer generators emit code that requires protobuf >= their own version.

protoc writes ``from backstop.v1 import resilience_pb2``; inside this package
the modules live at ``backstop._proto``, so that one import form is rewritten.
Nothing else is touched.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

GENERATOR = "1.66.2"

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent
REPO_ROOT = PACKAGE_ROOT.parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "backstop" / "v1"
OUT_DIR = PACKAGE_ROOT / "src" / "backstop" / "_proto"

INIT = '''"""Generated protobuf and gRPC stubs for ``backstop.v1``.

Do not edit: regenerate with ``python clients/python/scripts/gen_stubs.py``.
The idiomatic API is in :mod:`backstop`; these are for calls it does not wrap
(e.g. ``events_pb2_grpc.EventsStub`` for the live event stream).
"""
'''

_IMPORT = re.compile(rb"^from backstop\.v1 import ", re.MULTILINE)


def _grpc_tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def generate() -> dict[str, bytes]:
    """Runs protoc into a scratch directory; returns {file name: content}."""
    try:
        installed = _grpc_tools_version()
    except Exception as e:  # importlib.metadata.PackageNotFoundError
        raise SystemExit(
            f"grpcio-tools is not installed ({e}); pip install grpcio-tools=={GENERATOR}"
        ) from e
    if installed != GENERATOR:
        raise SystemExit(
            f"grpcio-tools {installed} is installed but the stubs are generated with "
            f"{GENERATOR} (see GENERATOR in {Path(__file__).name}); "
            f"pip install grpcio-tools=={GENERATOR}"
        )
    import grpc_tools  # type: ignore[import-untyped]

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
        out: dict[str, bytes] = {"__init__.py": INIT.encode()}
        gen = Path(tmp) / "backstop" / "v1"
        for f in sorted(gen.iterdir()):
            out[f.name] = _IMPORT.sub(b"from backstop._proto import ", f.read_bytes())
        return out


def check(files: dict[str, bytes], out_dir: Path) -> list[str]:
    """The differences between the stubs in out_dir and freshly generated ones."""
    problems: list[str] = []
    on_disk = {p.name for p in out_dir.iterdir() if p.is_file()} if out_dir.is_dir() else set()
    for name in sorted(on_disk - set(files)):
        problems.append(f"{name}: on disk but no longer generated")
    for name, content in sorted(files.items()):
        path = out_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        current = path.read_bytes()
        if current != content:
            diff = difflib.unified_diff(
                current.decode(errors="replace").splitlines(),
                content.decode(errors="replace").splitlines(),
                f"{name} (on disk)",
                f"{name} (from proto/)",
                lineterm="",
                n=1,
            )
            problems.append(f"{name}: stale\n" + "\n".join(list(diff)[:40]))
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when stale")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help=f"stub directory (default {OUT_DIR})")
    args = ap.parse_args()
    out_dir: Path = args.out
    files = generate()
    if args.check:
        problems = check(files, out_dir)
        if problems:
            print("generated stubs are stale against proto/:", file=sys.stderr)
            for p in problems:
                print("  " + p, file=sys.stderr)
            print(f"regenerate: python {os.path.relpath(__file__)}", file=sys.stderr)
            return 1
        print(f"stubs up to date ({len(files)} files)")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.is_file() and stale.name not in files:
            stale.unlink()
    for name, content in files.items():
        (out_dir / name).write_bytes(content)
    print(f"wrote {len(files)} files to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
