"""``tune``: meta-schedule search over each kernel's design space, into TVM's JSON database.

Rule-scheduled kernels go through ``ms.tune_tir`` (evolutionary search, XGBoost cost model) with
the space of ``tuning.space``; hand-mapped CUDA kernels are tuned by measuring each variant of
their knobs (``tuning.variants``). Both write ``database_workload.json`` and
``database_tuning_record.json`` under ``out_dir``, and a second run continues where the first
stopped: trials already recorded count toward ``trials``, and measured candidates are skipped.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from ..codegen.build import make_target
from ..kernel_set import HAND_MAPPED, KernelSetConfig, kernel_set_for
from . import records as log_records
from .measure import make_builder, make_runner, measure_and_commit
from .search import ModuleSet, ProgressCallback, ResumingSearch, measured_modules
from .space import design_space, hand_schedule
from .workload import ShapeBucket, head_dim_of, select_kernels, tuning_workload


@dataclass
class KernelResult:
    """What tuning one kernel gave: trials in the log and the best mean time (None: none ran)."""

    kernel: str
    trials: int
    new_trials: int
    best_seconds: float | None
    baseline_seconds: float | None  # the hand schedule's time, when it was measured


def tune(target="llvm", config: KernelSetConfig | None = None, families=("prefill", "decode"), trials: int = 64,
         out_dir=None, bucket: ShapeBucket | None = None, rpc=None, max_workers: int = 1,
         trials_per_iter: int = 16, population: int = 128, seed: int | None = None, progress=None,
         kernels=None) -> list[KernelResult]:
    """Tune the kernels of ``families`` for ``target``; returns one KernelResult per kernel.

    ``trials`` is the total per kernel, counting the ones already in ``out_dir``; ``rpc``:
    ``host:port:key`` of a TVM tracker (else local measurement); ``progress(kernel, total)`` makes a
    context manager that is called with (trials measured, best seconds) per batch (see cli).
    ``kernels`` optionally narrows the selection to these kernel names.
    """
    target = make_target(target)
    config = config or KernelSetConfig()
    bucket = bucket or ShapeBucket()
    if trials < 1:
        raise ValueError(f"trials: expected a positive number, got {trials}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_records.validate_log_dir(out_dir)  # a corrupt log is reported before TVM reads it
    log_records.expand_compressed(out_dir)  # a shipped log (xz workloads): TVM's database reads the plain file
    kernel_set = kernel_set_for(config, target)
    selected = select_kernels(kernel_set.funcs, families)
    if kernels:
        missing = sorted(set(kernels) - set(selected))
        if missing:
            raise ValueError(f"kernels: {missing} are not in the selected families {list(families)}")
        selected = {name: selected[name] for name in kernels}
    if not selected:
        raise ValueError(f"kernels: no kernel of families {list(families)} in a {target.kind.name} build")
    database = ms.database.JSONDatabase(work_dir=str(out_dir), module_equality="structural")
    builder, runner = make_builder(max_workers), make_runner(rpc, max_workers)
    results = []
    for name, func in selected.items():
        head_dim = head_dim_of(name, config.head_dims)
        if func.attrs.get(HAND_MAPPED):
            from .variants import tune_variants

            results.append(tune_variants(name, target, config, bucket, head_dim, database, builder, runner, trials,
                                         progress))
            continue
        results.append(_tune_rule_kernel(name, func, target, bucket, head_dim, database, builder, runner, trials,
                                          trials_per_iter, population, max_workers, seed, progress))
    return results


def _tune_rule_kernel(name, func, target, bucket, head_dim, database, builder, runner, trials, trials_per_iter,
                      population, max_workers, seed, progress) -> KernelResult:
    workload = tuning_workload(name, func, target, bucket, head_dim)
    previous = log_records.records_of(database, workload)
    measured = measured_modules(workload, previous)
    hand = hand_schedule(workload, func, target)
    baseline = next((seconds for mod, seconds in measured if tvm_ffi.structural_equal(mod, hand.mod)), None)
    remaining = trials - len(previous)
    with (progress(name, remaining) if progress and remaining > 0 else _silent()) as on_batch:
        if baseline is None and remaining > 0 and not any(tvm_ffi.structural_equal(m, hand.mod) for m, _ in measured):
            # the hand schedule first: the baseline, and a floor the search result never goes below
            baseline = measure_and_commit(hand.mod, hand.trace, workload, target, database, builder, runner)
            measured.append((hand.mod, baseline))
            remaining -= 1
            on_batch(1, baseline if baseline is not None else float("inf"))
        if baseline is not None and baseline >= log_records.FAILED_SECONDS:
            baseline = None
        if remaining <= 0:
            after = log_records.records_of(database, workload)
            return KernelResult(name, len(after), len(after) - len(previous), log_records.best_seconds(after), baseline)
        strategy = ResumingSearch(
            ms.search_strategy.EvolutionarySearch(population_size=population, init_min_unmeasured=min(50, population)),
            ModuleSet(mod for mod, _ in measured))
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), ProgressCallback(on_batch, baseline)]
        with tempfile.TemporaryDirectory(prefix="turbotvm-tune-") as work_dir:
            _quiet_meta_schedule_loggers()
            with without_tensor_intrinsics():
                ms.tune_tir(workload, target, work_dir, max_trials_global=remaining,
                            num_trials_per_iter=min(trials_per_iter, remaining), builder=builder, runner=runner,
                            database=database, cost_model="xgb", measure_callbacks=callbacks,
                            space=design_space(func, target), strategy=strategy, num_tuning_cores=max_workers,
                            seed=seed)
    after = log_records.records_of(database, workload)
    return KernelResult(name, len(after), len(after) - len(previous), log_records.best_seconds(after), baseline)


class _silent:
    def __enter__(self):
        return lambda done, best: None

    def __exit__(self, *exc):
        return False


def _quiet_meta_schedule_loggers() -> None:
    """meta-schedule logs every iteration at INFO to the console; keep that in its log files.

    Unnamed handlers on its logger are dropped first: ``tune_tir``'s logger set-up formats the name of
    every handler already there and fails on None (pytest 9.2 attaches one to non-propagating loggers),
    and its ``dictConfig`` would remove them anyway.
    """
    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        for handler in [h for h in logger.handlers if h.get_name() is None]:
            logger.removeHandler(handler)


_TENSOR_INTRIN = "tvm.s_tir.tensor_intrin"


@contextmanager
def without_tensor_intrinsics():
    """Skip the ``tvm.s_tir.tensor_intrin`` import that every ``TuneContext`` does.

    It scripts every tensor intrinsic of every target (about 70 s on 2 cores); turbotvm's spaces
    tensorize nothing. A placeholder stands in while tuning and is removed afterwards, so a
    later real import still works.
    """
    if _TENSOR_INTRIN in sys.modules:
        yield
        return
    placeholder = types.ModuleType(_TENSOR_INTRIN)
    sys.modules[_TENSOR_INTRIN] = placeholder
    try:
        yield
    finally:
        if sys.modules.get(_TENSOR_INTRIN) is placeholder:
            del sys.modules[_TENSOR_INTRIN]
