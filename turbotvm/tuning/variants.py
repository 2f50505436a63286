"""Knobs of hand-mapped kernels: each setting is a separate kernel, built by its factory.

A hand-mapped CUDA kernel is its own schedule, so its knobs (tile sizes, warps per CTA, ...) are
factory parameters, declared in ``KNOBS[family] = {parameter: choices}`` (first choice = the
kernel's default). Tuning builds and measures every setting with meta-schedule's builder and
runner and commits each to the database as a record of the *default* kernel whose trace holds
the setting: ``sample_categorical`` decisions annotated on the root block. At build time
``variant_from_trace`` replays that trace, reads the annotations and calls the factory with them.
"""

from __future__ import annotations

import inspect
import itertools
import re
from dataclasses import dataclass, field
from typing import Callable

import tvm
from tvm.s_tir import Schedule

from . import records as log_records
from .measure import measure_and_commit
from .workload import tuning_workload

KNOB_PREFIX = "turbotvm.knob."


@dataclass
class HandMappedFamily:
    """Kernels named ``pattern`` (groups = the factory's leading arguments), made by ``factory``."""

    pattern: str
    factory: Callable
    args: Callable  # re.Match -> positional arguments of the factory
    knobs: dict = field(default_factory=dict)  # parameter -> choices (first = default)
    target_args: Callable | None = None  # Target -> keyword arguments the target decides (not knobs)

    def make(self, name: str, settings: dict | None = None, target=None):
        match = re.fullmatch(self.pattern, name)
        if match is None:
            raise ValueError(f"kernel {name!r} does not match family pattern {self.pattern!r}")
        settings = dict(settings or {})
        accepted = inspect.signature(self.factory).parameters
        missing = [k for k in settings if k not in accepted]
        if missing:
            raise ValueError(f"{self.factory.__module__}.{self.factory.__name__} takes no knob {missing}: "
                             "add the parameter to the factory")
        if target is not None and self.target_args is not None:
            settings.update(self.target_args(target))
        return self.factory(*self.args(match), **settings)


def _cuda_families() -> dict:
    from ..kernels import decode_cuda, prefill_tc, quantize_cuda

    # A knob is a keyword parameter of the factory; its choices are listed here, the default first.
    return {
        "prefill_tc": HandMappedFamily(r"prefill_tc_(full|causal)_d(\d+)_(\w+)", prefill_tc.prefill_tc,
                                       lambda m: (int(m[2]), m[1] == "causal", m[3]),
                                       knobs={"warps": prefill_tc.WARP_CHOICES,
                                              "min_blocks": prefill_tc.MIN_BLOCKS_CHOICES}),
        "quantize_rows": HandMappedFamily(r"quantize_rows_(?:(smoothed|balanced)_)?(\w+?)_d(\d+)",
                                          quantize_cuda.quantize_rows,
                                          lambda m: (m[2], int(m[3]), m[1] or "plain", False)),
        "channel_smoothing": HandMappedFamily(r"channel_smoothing_(\w+)", quantize_cuda.channel_smoothing,
                                              lambda m: (m[1],)),
        "quantize_vt": HandMappedFamily(r"quantize_vt_(\w+?)_d(\d+)", quantize_cuda.quantize_rows,
                                        lambda m: (m[1], int(m[2]), "plain", True)),
        "decode_step_cuda": HandMappedFamily(r"decode_step_b([24])_d(\d+)_(\w+)", decode_cuda.decode_step_cuda,
                                             lambda m: (int(m[2]), int(m[1]), m[3]), knobs={"stages": (0, 2, 3, 4)},
                                             target_args=lambda t: {"copy_engine": decode_cuda.has_copy_engine(
                                                 t.attrs.get("arch"))}),
    }


#: Hand-mapped families by name; tests and the lead register more (``FAMILIES[name] = HandMappedFamily(...)``).
FAMILIES: dict[str, HandMappedFamily] = {}
#: ``KNOBS[family] = {parameter: choices}``: a view of FAMILIES' knobs (edit either).
KNOBS: dict[str, dict] = {}


def _registry() -> dict:
    if not FAMILIES:
        for family_name, family in _cuda_families().items():
            FAMILIES.setdefault(family_name, family)
    for family_name, family in FAMILIES.items():
        KNOBS.setdefault(family_name, family.knobs)
        family.knobs = KNOBS[family_name]
    return FAMILIES


def family_of(name: str) -> HandMappedFamily:
    for family in _registry().values():
        if re.fullmatch(family.pattern, name):
            return family
    raise ValueError(f"kernel {name!r}: no hand-mapped family matches it (register one in turbotvm.tuning.variants)")


def settings_of(family: HandMappedFamily):
    """Every knob setting of ``family``, the default (first choices) first."""
    names = list(family.knobs)
    for values in itertools.product(*(family.knobs[n] for n in names)):
        yield dict(zip(names, values))


def knob_trace(workload_mod, family: HandMappedFamily, setting: dict) -> Schedule:
    """A schedule of the default kernel whose trace records ``setting`` (nothing else changes)."""
    sch = Schedule(workload_mod)
    root = sch.get_sblock("root", func_name="main")
    for knob, choices in family.knobs.items():
        choices = list(choices)
        value = sch.sample_categorical(choices, [1.0 / len(choices)] * len(choices),
                                       decision=choices.index(setting[knob]))
        sch.annotate(root, KNOB_PREFIX + knob, value)
    return sch


def setting_from_trace(trace, default_mod) -> dict:
    sch = Schedule(default_mod)
    trace.apply_to_schedule(sch, remove_postproc=False)
    root = sch.get(sch.get_sblock("root", func_name="main"))
    return {str(k)[len(KNOB_PREFIX):]: int(v) for k, v in root.annotations.items() if str(k).startswith(KNOB_PREFIX)}


def variant_from_trace(name: str, trace, target):
    """The kernel ``name`` built with the knob setting its record's trace holds."""
    family = family_of(name)
    default = family.make(name, target=target)
    return family.make(name, setting_from_trace(trace, tvm.IRModule({"main": default})), target)


def tune_variants(name, target, config, bucket, head_dim, database, builder, runner, trials, progress):
    """Measure up to ``trials`` knob settings of hand-mapped kernel ``name`` (skipping logged ones)."""
    from .tuner import KernelResult, _silent

    family = family_of(name)
    default = family.make(name, target=target).with_attr("global_symbol", name)
    workload = tuning_workload(name, default, target, bucket, head_dim)
    previous = log_records.records_of(database, workload)
    done = [setting_from_trace(r.trace, workload) for r in previous]
    todo = [s for s in settings_of(family) if s not in done][:max(0, trials - len(previous))]
    best = log_records.best_seconds(previous)
    baseline = _baseline_seconds(previous, workload, family)
    with (progress(name, len(todo)) if progress and todo else _silent()) as on_batch:
        for setting in todo:
            seconds = _measure(name, family, setting, workload, target, bucket, head_dim, database, builder, runner)
            if setting == next(settings_of(family)):
                baseline = seconds
            if seconds is not None:
                best = seconds if best is None else min(best, seconds)
            on_batch(1, best if best is not None else float("inf"))
    after = log_records.records_of(database, workload)
    return KernelResult(name, len(after), len(after) - len(previous), log_records.best_seconds(after), baseline)


def _baseline_seconds(records, workload, family):
    """Time of the default setting (the untuned kernel) among ``records``; None if absent or failed."""
    default = next(settings_of(family))
    for record in records:
        if setting_from_trace(record.trace, workload) == default:
            seconds = log_records.mean_seconds(record)
            return seconds if seconds < log_records.FAILED_SECONDS else None
    return None


def _measure(name, family, setting, workload, target, bucket, head_dim, database, builder, runner):
    """Build and run the kernel with ``setting``; its record is a trace of the default kernel."""
    variant = tuning_workload(name, family.make(name, setting, target), target, bucket, head_dim)
    trace = knob_trace(workload, family, setting).trace
    return measure_and_commit(variant, trace, workload, target, database, builder, runner)
