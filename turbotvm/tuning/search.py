"""Search-loop pieces around meta-schedule's evolutionary search: resume without re-measuring, progress.

TVM's EvolutionarySearch forgets, between runs, which candidates the database already holds (it
only seeds its population with the best of them), so a resumed run would measure some again.
``ResumingSearch`` wraps it and drops every candidate whose scheduled module is already measured.
"""

from __future__ import annotations

import time

import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

#: How often to ask the inner search again when all its candidates were measured before.
_REFILL_TRIES = 4


class ModuleSet:
    """Scheduled modules, compared structurally (hash first, then ``structural_equal``)."""

    def __init__(self, mods=()):
        self._by_hash: dict[int, list] = {}
        for mod in mods:
            self.add(mod)

    def add(self, mod) -> bool:
        """Add ``mod``; False if an equal module was already there."""
        bucket = self._by_hash.setdefault(tvm_ffi.structural_hash(mod), [])
        if any(tvm_ffi.structural_equal(mod, other) for other in bucket):
            return False
        bucket.append(mod)
        return True

    def __contains__(self, mod) -> bool:
        bucket = self._by_hash.get(tvm_ffi.structural_hash(mod), [])
        return any(tvm_ffi.structural_equal(mod, other) for other in bucket)

    def copy(self) -> ModuleSet:
        other = ModuleSet()
        other._by_hash = {h: list(mods) for h, mods in self._by_hash.items()}
        return other


def measured_modules(workload_mod, records) -> list:
    """(scheduled module, mean seconds) of each of ``records`` (records of ``workload_mod``)."""
    from .records import mean_seconds

    measured = []
    for record in records:
        sch = Schedule(workload_mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        measured.append((sch.mod, mean_seconds(record)))
    return measured


@derived_object
class ResumingSearch(PySearchStrategy):
    """An evolutionary search that skips candidates measured in an earlier run (``known``)."""

    def __init__(self, inner: ms.search_strategy.SearchStrategy, known: ModuleSet):
        self.inner = inner
        self.known = known.copy()

    def _initialize_with_tune_context(self, context) -> None:
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        for _ in range(_REFILL_TRIES):
            candidates = self.inner.generate_measure_candidates()
            if candidates is None:
                return None
            fresh = [candidate for candidate in candidates if self.known.add(candidate.sch.mod)]
            if fresh:
                return fresh
        return None  # the space is exhausted around what is already measured

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return ResumingSearch(self.inner.clone(), self.known)


@derived_object
class ProgressCallback(PyMeasureCallback):
    """Reports each measured batch: trials done, best time so far (to a tqdm bar or a function)."""

    def __init__(self, on_batch, best: float | None = None):
        self.on_batch = on_batch
        self.best = float("inf") if best is None else best
        self.done = 0
        self.started = time.time()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        for built, ran in zip(builder_results, runner_results):
            self.done += 1
            if built.error_msg is None and ran.error_msg is None and ran.run_secs:
                seconds = sum(float(s) for s in ran.run_secs) / len(ran.run_secs)
                self.best = min(self.best, seconds)
        self.on_batch(len(runner_results), self.best)
