"""Deployable modules: ``export`` writes <dir>/kernels.so + manifest.json, ``load`` checks and reopens them.

The manifest records what the library was built for (kernel names and ABI, head dims, dtypes, target,
TVM versions) and its SHA-256, so a truncated, corrupt or foreign file is refused with a clear
error before TVM opens it, and a loaded module refuses calls it has no kernel for.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tvm

from ..kernel_set import KERNEL_ABI, KernelSetConfig
from .build import CompiledKernels, make_target, missing_cpu_features

MANIFEST = "manifest.json"
LIBRARY = "kernels.so"
FORMAT = "turbotvm-module/1"


def _versions() -> dict:
    def of(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "unknown"

    return {"turbotvm": of("turbotvm"), "tvm": tvm.__version__, "tvm_ffi": of("apache-tvm-ffi")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export(compiled: CompiledKernels, out_dir) -> Path:
    """Write the compiled library and its manifest into ``out_dir``; returns the directory."""
    if compiled.target_kind == "cuda" and not tvm.cuda().exist:
        raise RuntimeError("export: a CUDA build can only be exported where CUDA can compile it to a binary "
                           "(no GPU here: use emit-cuda for the source)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / LIBRARY
    compiled.module.export_library(str(library))
    manifest = {
        "format": FORMAT,
        "versions": _versions(),
        "target": compiled.target,
        "target_kind": compiled.target_kind,
        "config": compiled.config.to_json(),
        "kernels": list(compiled.names),
        "kernel_abi": KERNEL_ABI,
        "library": LIBRARY,
        "sha256": _sha256(library),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def read_manifest(module_dir) -> dict:
    path = Path(module_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"module_dir: expected {path} (written by turbotvm build/export), not found")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a turbotvm manifest (invalid JSON: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    missing = [k for k in ("versions", "target", "target_kind", "config", "kernels", "library", "sha256") if k not in manifest]
    if missing:
        raise ValueError(f"{path}: manifest lacks {missing}")
    return manifest


def load(module_dir) -> CompiledKernels:
    """Reopen an exported module (no tuning, no compiling) after checking manifest and checksum."""
    module_dir = Path(module_dir)
    manifest = read_manifest(module_dir)
    built_with = manifest["versions"].get("tvm")
    if built_with != tvm.__version__:
        raise ValueError(f"{module_dir / MANIFEST}: built with TVM {built_with}, this is TVM {tvm.__version__}: rebuild it")
    abi = manifest.get("kernel_abi", 1)  # exports before the field existed hold version 1
    if abi != KERNEL_ABI:
        raise ValueError(f"{module_dir / MANIFEST}: kernel ABI {abi}, this turbotvm's is {KERNEL_ABI} (other kernel "
                         "arguments or cache layout, see turbotvm.kernel_set.KERNEL_ABI): rebuild it")
    if manifest["target_kind"] == "llvm":
        missing = missing_cpu_features(make_target(manifest["target"]))
        if missing:
            raise ValueError(f"{module_dir / MANIFEST}: built for CPU target {manifest['target']}, whose instructions this "
                             f"CPU lacks ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}): rebuild it here, "
                             "or build with a portable target such as {\"kind\": \"llvm\"}")
    library = module_dir / manifest["library"]
    if not library.is_file():
        raise FileNotFoundError(f"{library}: library named by the manifest is missing")
    if _sha256(library) != manifest["sha256"]:
        raise ValueError(f"{library}: checksum differs from the manifest (truncated, corrupt or replaced file)")
    try:
        module = tvm.runtime.load_module(str(library))
    except Exception as err:  # TVM reports a bad library through its own error types
        raise ValueError(f"{library}: TVM could not load it ({err})") from None
    names = tuple(manifest["kernels"])
    absent = [name for name in names if module.get_function(name, query_imports=True) is None]
    if absent:
        raise ValueError(f"{library}: manifest names kernels the library lacks: {absent[:5]}")
    return CompiledKernels(module, KernelSetConfig.from_json(manifest["config"]), manifest["target_kind"],
                           manifest["target"], names)
