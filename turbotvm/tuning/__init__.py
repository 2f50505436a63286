"""Auto-tuning: meta-schedule design spaces over turbotvm's schedules, TVM JSON logs, build-time lookup.

- ``tune(target, config, families, trials, out_dir, ...)``: evolutionary search with the XGBoost
  cost model (rule-scheduled kernels) or every knob setting (hand-mapped kernels), resumable.
- ``build(..., tuning_log=dir)`` (turbotvm.codegen) applies the best records (``lookup``).
- ``KNOBS`` / ``FAMILIES`` (``variants``): the knobs of hand-mapped CUDA kernels.

Names load on first use, so importing the package (the CLI does) stays cheap.
"""

from importlib import import_module

_EXPORTS = {
    "tune": "tuner", "KernelResult": "tuner",
    "ShapeBucket": "workload", "arch_name": "workload",
    "TuningLogError": "records", "read_log": "records",
    "TuningNotice": "lookup", "tuned_kernels": "lookup",
    "KNOBS": "variants", "FAMILIES": "variants", "HandMappedFamily": "variants",
    "RPCSpec": "measure", "design_space": "space",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
