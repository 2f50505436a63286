"""Meta-schedule design spaces: turbotvm's own schedule rules, with their numbers sampled.

The space of a kernel is the hand rule (``schedules.cpu`` / ``schedules.cuda``) run with
``SampledKnobs``: every choice the rule makes becomes a ``sample_categorical`` or
``sample_perfect_tile`` instruction, so one design-space trace covers all knob settings and
meta-schedule's evolutionary search (with the XGBoost cost model) picks the values. Only the
values differ between candidates, never the structure, so a tuned trace replays on the symbolic
kernel at build time.
"""

from __future__ import annotations

from tvm import IRModule
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from ..schedules import schedule_for
from ..schedules.knobs import HandKnobs

#: Categorical knob values (the hand choice is among them, so tuning never loses it).
PARALLEL_CHUNKS = (1, 2, 4, 8)  # CPU: tile iterations per parallel task
UNROLL_STEPS = (0, 16, 64, 512)  # CPU: pragma_auto_unroll_max_step on the parallel loop
THREADS_PER_BLOCK = (32, 64, 128, 256, 512)  # CUDA SIMT rule
MAX_VECTOR_LANES = 64  # CPU: largest inner factor of a vectorized split


def _uniform(values):
    return [1.0 / len(values)] * len(values)


class _VectorPlan(HandKnobs):
    """Runs the hand rule on the symbolic kernel and notes which blocks it vectorizes there.

    A tuning workload has concrete sizes, so loops over D or N that are symbolic in the built
    kernel look vectorizable in it; vectorizing only what the symbolic kernel can keeps the
    tuned trace valid on it.
    """

    def __init__(self):
        self.blocks: set[str] = set()

    def vectorize(self, sch: Schedule, block, loop) -> None:
        sch.vectorize(loop)
        self.blocks.add(sch.get(block).name_hint)


class SampledKnobs(HandKnobs):
    """The rules' choices as meta-schedule samples (see the module docstring)."""

    def __init__(self, vector_blocks: set[str] | None = None):
        self.vector_blocks = vector_blocks

    def parallel(self, sch: Schedule, loop):
        chunk = sch.sample_categorical(list(PARALLEL_CHUNKS), _uniform(PARALLEL_CHUNKS))
        tasks, _ = sch.split(loop, factors=[None, chunk])
        sch.parallel(tasks)
        return tasks

    def unroll(self, sch: Schedule, loop) -> None:
        step = sch.sample_categorical(list(UNROLL_STEPS), _uniform(UNROLL_STEPS))
        sch.annotate(loop, "pragma_auto_unroll_max_step", step)
        sch.annotate(loop, "pragma_unroll_explicit", 1)

    def vectorize(self, sch: Schedule, block, loop) -> None:
        if self.vector_blocks is not None and sch.get(block).name_hint not in self.vector_blocks:
            return
        factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=MAX_VECTOR_LANES)
        _, lanes = sch.split(loop, factors=factors)
        sch.vectorize(lanes)

    def threads_per_block(self, sch: Schedule, loop):
        return sch.sample_categorical(list(THREADS_PER_BLOCK), _uniform(THREADS_PER_BLOCK))


class _PlannedHandKnobs(HandKnobs):
    """The hand choices, vectorizing only what the symbolic kernel allows (see ``_VectorPlan``)."""

    def __init__(self, vector_blocks: set[str] | None):
        self.vector_blocks = vector_blocks

    def vectorize(self, sch: Schedule, block, loop) -> None:
        if self.vector_blocks is None or sch.get(block).name_hint in self.vector_blocks:
            sch.vectorize(loop)


def hand_schedule(workload_mod, func, target) -> Schedule:
    """The untuned schedule of the tuning workload (measured first: tuning never loses to it)."""
    vector_blocks = vector_plan(func, target) if target.kind.name == "llvm" else None
    sch = Schedule(workload_mod)
    schedule_for(target)(sch, "main", target, _PlannedHandKnobs(vector_blocks))
    return sch


def vector_plan(func, target) -> set[str]:
    """Names of the blocks whose innermost loop the hand rule vectorizes in the symbolic ``func``."""
    plan = _VectorPlan()
    schedule_for(target)(Schedule(IRModule({"main": func})), "main", target, plan)
    return plan.blocks


def apply_sampled_rule(sch: Schedule, target, vector_blocks: set[str] | None) -> Schedule:
    """The design-space function: the target's rule on ``main`` with sampled knobs."""
    schedule_for(target)(sch, "main", target, SampledKnobs(vector_blocks))
    return sch


def _mutators(target) -> dict:
    mutators = {ms.mutator.MutateTileSize(): 0.9}  # vector widths
    if target.kind.name == "cuda":
        mutators[ms.mutator.MutateThreadBinding()] = 0.1  # threads per block
    return mutators


def design_space(func, target) -> ms.space_generator.ScheduleFn:
    """The ScheduleFn space of one kernel: no extra TVM rules or postprocessors, only our knobs.

    ``func`` is the symbolic kernel (used to plan what may be vectorized); the space itself is
    applied to its specialized tuning workload.
    """
    vector_blocks = vector_plan(func, target) if target.kind.name == "llvm" else None

    def space(sch: Schedule) -> Schedule:
        return apply_sampled_rule(sch, target, vector_blocks)

    return ms.space_generator.ScheduleFn(space, sch_rules=[], postprocs=[], mutator_probs=_mutators(target))
