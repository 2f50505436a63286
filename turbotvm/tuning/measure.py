"""Builders and runners for tuning: local processes, or any machine behind a TVM RPC tracker.

The runners fill kernel inputs at random, except int32 buffers: in turbotvm those hold head
indices (``heads`` of compress/decode), which must stay in range, or scratch (compress's widths and
ranks), so they are zero-filled.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import cloudpickle
import numpy as np
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig


#: What meta-schedule records as the run time of a failed build or run.
FAILED_RUN_SECONDS = 1e10

# Workers receive this module's functions by value: they then import only TVM, not turbotvm (and torch).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RPCSpec(NamedTuple):
    """``host:port:key`` of a TVM RPC tracker and the device key its servers registered with."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> RPCSpec:
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].isdigit():
            raise ValueError(f"rpc: expected 'host:port:key' (e.g. 127.0.0.1:9190:h200), got {text!r}")
        return cls(parts[0], int(parts[1]), parts[2])


def _fill(arg, dtype, shape, random_fill) -> None:
    if dtype == "int32":
        arg.copyfrom(np.zeros(shape, dtype="int32"))
    else:
        random_fill(arg)


def alloc_local(device, args_info, alloc_repeat):
    """LocalRunner ``f_alloc_argument``: random inputs, int32 index buffers zeroed."""
    import tvm
    from tvm_ffi import get_global_func

    random_fill = get_global_func("tvm.contrib.random.random_fill_for_measure")
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for kind, dtype, shape in args_info:
            if kind != "TENSOR":
                raise NotImplementedError(f"tuning inputs: expected only tensors, got {kind}")
            arg = tvm.runtime.empty(shape=shape, dtype=dtype, device=device)
            _fill(arg, dtype, shape, random_fill)
            args.append(arg)
        repeated.append(args)
    return repeated


def alloc_rpc(session, device, args_info, alloc_repeat):
    """RPCRunner ``f_alloc_argument``: the same inputs, allocated on the remote device."""
    import tvm

    random_fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for kind, dtype, shape in args_info:
            if kind != "TENSOR":
                raise NotImplementedError(f"tuning inputs: expected only tensors, got {kind}")
            arg = tvm.runtime.empty(shape=shape, dtype=dtype, device=device)
            _fill(arg, dtype, shape, random_fill)
            args.append(arg)
        repeated.append(args)
    return repeated


def evaluator_config(min_repeat_ms: int = 50) -> EvaluatorConfig:
    return EvaluatorConfig(number=3, repeat=1, min_repeat_ms=min_repeat_ms, enable_cpu_cache_flush=False)


def build_candidate(mod, target, _params):
    """LocalBuilder ``f_build``: meta-schedule's default build without its first step.

    That step imports ``tvm.s_tir.tensor_intrin`` (over a minute on 2 cores, in every fresh
    worker); turbotvm's spaces tensorize nothing, so the import is skipped.
    """
    from tvm.driver import build

    return build(mod, target=target)


def make_builder(max_workers: int = 1, timeout_sec: float = 120.0) -> ms.builder.Builder:
    return ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=timeout_sec, f_build=build_candidate)


def make_runner(rpc: RPCSpec | str | None = None, max_workers: int = 1, min_repeat_ms: int = 50,
                timeout_sec: float = 60.0) -> ms.runner.Runner:
    """A LocalRunner, or an RPCRunner through the tracker ``rpc`` (its servers measure in parallel)."""
    config = evaluator_config(min_repeat_ms)
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=config, f_alloc_argument=alloc_local)
    rpc = RPCSpec.parse(rpc) if isinstance(rpc, str) else rpc
    rpc_config = RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                           session_priority=1, session_timeout_sec=int(timeout_sec))
    return ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=config, max_workers=max_workers,
                               f_alloc_argument=alloc_rpc)


def measure_and_commit(measured_mod, trace, workload_mod, target, database, builder, runner) -> float | None:
    """Build and run ``measured_mod`` once, commit its record (``trace`` on ``workload_mod``) to
    ``database``; returns the mean seconds, or None if the build or the run failed."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    args_info = ArgInfo.from_entry_func(measured_mod, remove_preproc=True)
    (built,) = builder.build([ms.builder.BuilderInput(measured_mod, target)])
    run_secs = [FAILED_RUN_SECONDS]
    if built.error_msg is None:
        device_type = "cuda" if target.kind.name == "cuda" else "cpu"
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device_type, args_info)])
        result = future.result()
        if result.error_msg is None and result.run_secs:
            run_secs = [float(s) for s in result.run_secs]
    database.commit_tuning_record(ms.database.TuningRecord(
        trace, database.commit_workload(workload_mod), run_secs, target, args_info))
    return None if run_secs[0] >= FAILED_RUN_SECONDS else sum(run_secs) / len(run_secs)
