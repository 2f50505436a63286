"""On-disk cache of built kernel sets: build once per key, then load in milliseconds.

Layout: ``<cache_dir>/<entry>/{kernels.so, manifest.json, key.json}`` (``export()``'s module plus the
key). An entry appears only by renaming a finished temporary directory into place, so no process
ever sees a half-written one; a corrupt or unloadable entry is reported, removed and rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import tvm

from ..kernel_set import KernelSetConfig
from .build import CompiledKernels, build, make_target
from .export import MANIFEST, _versions, export, load

CACHE_FORMAT = "turbotvm-cache/1"
KEY_FILE = "key.json"
_PACKAGE = Path(__file__).resolve().parent.parent
#: The sources that decide the compiled code: editing one of them invalidates older entries.
_SOURCES = ("algorithm.py", "kernel_set.py", "kernels/**/*.py", "schedules/**/*.py", "codegen/build.py",
            "codegen/export.py", "tuning/lookup.py", "tuning/variants.py")
_TEMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"
#: Temporary or half-removed directories older than this were left by a killed process.
_STALE_SECONDS = 24 * 3600


class ModuleCacheWarning(UserWarning):
    """A cache entry could not be used (it is removed and rebuilt)."""


def default_cache_dir() -> Path:
    """``$TURBOTVM_CACHE_DIR`` if set, else ``~/.cache/turbotvm``."""
    return Path(os.environ.get("TURBOTVM_CACHE_DIR") or Path.home() / ".cache" / "turbotvm").expanduser()


def _hash_sources() -> str:
    digest = hashlib.sha256()
    for path in sorted({p for pattern in _SOURCES for p in _PACKAGE.glob(pattern)}):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(_PACKAGE).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


#: Hashed at import, right after the kernels and schedules were imported: the code this process runs,
#: even if the files are edited later.
_SOURCE_SHA256 = _hash_sources()


def source_hash() -> str:
    """SHA-256 over the kernel, schedule and codegen sources (any edit gives new entries)."""
    return _SOURCE_SHA256


def _host_cpu() -> str:
    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # TVM built without LLVM
        return platform.processor() or "unknown"


def cache_key(target, config: KernelSetConfig, tuning_log=None) -> dict:
    """Everything the binary of an entry depends on; two builds share an entry only if all of it matches.

    - ``target``: the full target string (kind, CUDA arch, LLVM triple, cores), plus the host machine
      and CPU, as an LLVM build without ``mcpu`` may still be tuned to the host.
    - ``versions``: TVM, apache-tvm-ffi and turbotvm (codegen and runtime ABI).
    - ``source_sha256``: the kernel/schedule/codegen sources, so that editing a kernel invalidates it.
    - ``config``: the shape bucket (head dims, dtypes); batch, heads and sequence stay symbolic.
    - ``tuning_log`` (only with one): SHA-256 of the log files the build reads, so a re-tuned log
      gives a new entry.
    """
    target = make_target(target)
    key = {
        "format": CACHE_FORMAT,
        "target": str(target),
        "host": {"machine": platform.machine(), "cpu": _host_cpu()},
        "versions": _versions(),
        "source_sha256": source_hash(),
        "config": config.to_json(),
    }
    if tuning_log is not None:
        from ..tuning.lookup import log_hash

        key["tuning_log_sha256"] = log_hash(tuning_log, target)
    return key


def entry_name(target, config: KernelSetConfig, key: dict | None = None) -> str:
    """Directory name of an entry: a readable prefix plus 16 hex digits of the key's hash."""
    target = make_target(target)
    key = cache_key(target, config) if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    arch = target.attrs.get("arch") if target.kind.name == "cuda" else key["host"]["cpu"]
    parts = [target.kind.name, str(arch), "d" + "_".join(map(str, config.head_dims)), "_".join(config.dtypes), digest]
    return "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", part) for part in parts)


def load_or_build(target="llvm", config: KernelSetConfig | None = None, cache_dir=None,
                  progress: bool = False, tuning_log=None) -> CompiledKernels:
    """The kernel set for (target, config[, tuning_log]): loaded from the cache, else built, stored and loaded."""
    target = make_target(target)
    config = KernelSetConfig() if config is None else config
    if not isinstance(config, KernelSetConfig):
        raise TypeError(f"config: expected a KernelSetConfig, got {type(config).__name__}")
    if target.kind.name == "cuda" and not tvm.cuda().exist:
        raise RuntimeError("load_or_build: a CUDA entry needs a GPU here to compile its binary "
                           "(use build() or emit_cuda_source() for the source alone)")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(target, config, tuning_log)
    entry = cache_dir / entry_name(target, config, key)
    if entry.exists() and (cached := _load_entry(entry, key, config)) is not None:
        return cached

    _remove_stale(cache_dir)
    compiled = build(target, config, progress, tuning_log)
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{entry.name}-", dir=cache_dir))
    try:
        export(compiled, temp)
        (temp / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
        for _ in range(2):  # a second try only if the entry that beat ours was unusable (and removed)
            if _publish(temp, entry):
                break
            if (theirs := _load_entry(entry, key, config)) is not None:
                return theirs  # another process won the race: use its entry, drop ours
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # already gone if it was renamed into place
    return _load_entry(entry, key, config) or compiled


def _publish(temp: Path, entry: Path) -> bool:
    """Atomically rename the finished ``temp`` into place; False if an entry is already there."""
    try:
        os.rename(temp, entry)
        return True
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise


def _load_entry(entry: Path, key: dict, config: KernelSetConfig) -> CompiledKernels | None:
    """The loaded entry, or None after warning about it and removing it."""
    try:
        stored = json.loads((entry / KEY_FILE).read_text())
        if stored != key:
            differ = sorted(k for k in key if not isinstance(stored, dict) or stored.get(k) != key[k])
            raise ValueError(f"{KEY_FILE} holds another key (differs in {differ})")
        compiled = load(entry)
        if compiled.config != config:
            raise ValueError(f"{MANIFEST} is for {compiled.config}, expected {config}")
        return compiled
    except Exception as err:  # any damage means rebuild, never a crash
        warnings.warn(f"turbotvm module cache: removing unusable entry {entry} and rebuilding: {err}",
                      ModuleCacheWarning, stacklevel=3)
        _remove(entry)
        return None


def _remove(path: Path) -> None:
    """Rename out of the way first (atomic for other processes), then delete."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another process removed it first
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(cache_dir: Path) -> None:
    now = time.time()
    for path in cache_dir.glob(".*"):
        try:
            if path.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)) and now - path.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_entries(cache_dir=None) -> list[dict]:
    """Each entry: ``path``, ``size`` in bytes and its ``key`` (None if key.json is unreadable)."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    entries = []
    for path in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else ():
        if path.is_dir() and not path.name.startswith(".") and any((path / f).exists() for f in (MANIFEST, KEY_FILE)):
            try:
                key = json.loads((path / KEY_FILE).read_text())
            except (OSError, ValueError):
                key = None
            entries.append({"path": path, "size": _size(path), "key": key})
    return entries


def clear_cache(cache_dir=None) -> tuple[int, int]:
    """Remove every entry (and stale temporaries); returns (entries removed, bytes freed).

    Only directories holding a manifest or key.json are removed, so a cache_dir pointing at a folder
    of other things leaves those things alone.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    entries = cache_entries(cache_dir)
    for entry in entries:
        _remove(entry["path"])
    if cache_dir.is_dir():
        _remove_stale(cache_dir)
    return len(entries), sum(entry["size"] for entry in entries)
