"""Build-time lookup: the best logged schedule of each kernel, replayed on the symbolic kernel.

``tuned_kernels(tuning_log, funcs, target)`` returns the kernels it has a usable record for,
already scheduled; the caller schedules the rest by hand. Kernels without a record get the hand
schedule and one notice per build; a stale record (tuned for other kernel code) counts as none.
A log that is corrupt, foreign or from another TVM raises TuningLogError (file and line), and
so does a record whose trace does not replay: a kernel is tuned as logged or not at all.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from ..kernel_set import HAND_MAPPED
from .records import RECORDS, WORKLOADS, TuningLogError, read_log, rewrite_log, workload_file
from .workload import arch_name, content_hash, kernel_fingerprint


class TuningNotice(UserWarning):
    """Some kernels of a build use the hand schedule (no usable tuning record for them)."""


def log_dir_for(tuning_log, target) -> Path | None:
    """The directory holding the log for ``target``: ``tuning_log`` itself or ``tuning_log/<arch>``."""
    root = Path(tuning_log)
    if not root.exists():
        raise FileNotFoundError(f"tuning_log: {root} does not exist (expected a directory written by turbotvm tune)")
    if root.is_file():
        raise TuningLogError(root, None, f"expected a directory holding {WORKLOADS} and {RECORDS}, got a file")
    for candidate in (root, root / arch_name(target)):
        if workload_file(candidate).is_file():
            return candidate
    return None


def log_hash(tuning_log, target) -> str | None:
    """Content hash of the log a build for ``target`` would read (None: no tuning log)."""
    if tuning_log is None:
        return None
    found = log_dir_for(tuning_log, target)
    return content_hash(workload_file(found), found / RECORDS) if found else "no-log-for-" + arch_name(target)


def tuned_kernels(tuning_log, funcs: dict, target) -> dict:
    """Scheduled prim_funcs (by name) of the kernels in ``funcs`` that the log has a record for."""
    arch = arch_name(target)
    log_dir = log_dir_for(tuning_log, target)
    if log_dir is None:
        _notice(f"turbotvm: no tuning log for {arch} in {tuning_log}: all {len(funcs)} kernels use the hand schedule")
        return {}
    by_kernel = {}
    for logged in read_log(log_dir):
        meta = logged.meta
        if meta["arch"] == arch and meta["target_kind"] == target.kind.name:
            by_kernel.setdefault(meta["kernel"], []).append(logged)
    tuned, untuned, stale = {}, [], []
    for name, func in funcs.items():
        fresh = [w for w in by_kernel.get(name, []) if w.meta["kernel_hash"] == kernel_fingerprint(func)]
        if by_kernel.get(name) and not fresh:
            stale.append(name)
        best = _best_of_largest_bucket(fresh)
        if best is None:
            untuned.append(name)
            continue
        tuned[name] = _replay(log_dir, best, name, func, target)
    if untuned:
        shown = ", ".join(untuned[:4]) + (", ..." if len(untuned) > 4 else "")
        why = f" ({len(stale)} with records for older kernel code)" if stale else ""
        _notice(f"turbotvm: tuning log {log_dir} has no record for {len(untuned)} of {len(funcs)} kernels{why}; "
                f"hand schedule for: {shown}")
    return tuned


def prune_stale(log_dir, funcs: dict, target) -> int:
    """Drop from the log in ``log_dir`` the workloads of kernels in ``funcs`` that were tuned for other
    kernel code (lookup ignores them; re-tuning after a kernel change leaves them behind). Workloads
    of kernels not in ``funcs`` or of other targets are kept. Returns how many were dropped."""
    arch = arch_name(target)
    fingerprints = {name: kernel_fingerprint(func) for name, func in funcs.items()}

    def current(logged) -> bool:
        meta = logged.meta
        if meta["arch"] != arch or meta["target_kind"] != target.kind.name or meta["kernel"] not in fingerprints:
            return True
        return meta["kernel_hash"] == fingerprints[meta["kernel"]]

    return rewrite_log(log_dir, current)


def _best_of_largest_bucket(logged_workloads):
    """The workload to build from: a build holds one kernel per name for every shape, and times of
    different buckets do not compare, so the largest tuned bucket (where the time goes) decides."""
    measured = [w for w in logged_workloads if w.best()]
    if not measured:
        return None

    def work(w):
        bucket = w.meta["bucket"]
        return bucket["batch"] * bucket["heads"] * bucket["seq_len"]

    largest = max(work(w) for w in measured)
    return min((w for w in measured if work(w) == largest), key=lambda w: w.best()[1])


def _notice(message: str) -> None:
    warnings.warn(message, TuningNotice, stacklevel=4)


def _replay(log_dir: Path, logged, name: str, func, target):
    """``func`` scheduled by the best record of ``logged`` (hand-mapped: the logged variant)."""
    line, _, record_json = logged.best()
    path = log_dir / RECORDS
    try:
        workload = ms.database.Workload.from_json(logged.json_obj)
        trace = ms.database.TuningRecord.from_json(record_json, workload).trace
        if func.attrs.get(HAND_MAPPED):
            from .variants import variant_from_trace

            return variant_from_trace(name, trace, target).with_attr("global_symbol", name).with_attr(HAND_MAPPED, True)
        sch = Schedule(tvm.IRModule({"main": func}))
        trace.apply_to_schedule(sch, remove_postproc=False)
        return sch.mod["main"]
    except TuningLogError:
        raise
    except Exception as err:  # a trace TVM cannot replay on this kernel
        raise TuningLogError(path, line, f"the record for {name} does not apply to it "
                                         f"({str(err).strip().splitlines()[-1][:200]})") from None
