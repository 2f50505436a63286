"""Tuning on the CPU: tune a few trials into TVM's JSON database, rebuild from it, bad logs, resume, RPC.

One module fixture tunes two small kernels (quantize, causal prefill) at a small shape bucket;
the other tests copy or damage that log. Lookup and validation tests schedule without compiling.
"""

import json
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.script import tirx as T

from turbotvm import TurboAttention
from turbotvm import reference as ref
from turbotvm.cli import main as cli_main
from turbotvm.codegen import build
from turbotvm.codegen.build import make_target, schedule_module
from turbotvm.codegen.module_cache import cache_key, entry_name
from turbotvm.kernel_set import HAND_MAPPED, KernelSetConfig, make_kernel_set
from turbotvm.testing import cosine, random_qkv
from turbotvm.tuning import records, variants
from turbotvm.tuning.lookup import TuningNotice, tuned_kernels
from turbotvm.tuning.records import RECORDS, WORKLOADS, TuningLogError, read_log
from turbotvm.tuning.tuner import tune
from turbotvm.tuning.workload import ATTR, ShapeBucket, arch_name

SMALL = KernelSetConfig(head_dims=(64,), dtypes=("float32",))
BUCKET = ShapeBucket(batch=1, heads=4, kv_heads=2, seq_len=128)
TUNED = {"quantize_float32": 3, "prefill_causal_d64_float32": 2}  # kernel -> trials (the first is the hand schedule)
TARGET = make_target("llvm")


def quick_tune(out_dir, kernels, trials, **kwargs):
    families = sorted({"prefill" if k.startswith("prefill") else "quantize" for k in kernels})
    return tune("llvm", SMALL, families, trials, out_dir, BUCKET, kernels=kernels, population=16, trials_per_iter=4,
                seed=0, **kwargs)


@pytest.fixture(scope="module")
def tuned_log(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tuning_logs") / arch_name(TARGET)
    for kernel, trials in TUNED.items():
        (result,) = quick_tune(log_dir, [kernel], trials)
        assert (result.kernel, result.trials, result.new_trials) == (kernel, trials, trials)
        assert result.best_seconds is not None and result.baseline_seconds is not None
        assert result.best_seconds <= result.baseline_seconds  # the hand schedule is measured first
    return log_dir


@pytest.fixture
def log_copy(tuned_log, tmp_path):
    copy = tmp_path / "logs" / arch_name(TARGET)
    shutil.copytree(tuned_log, copy)
    return copy


def small_funcs():
    return make_kernel_set(SMALL, "llvm").funcs


def lines(path):
    return path.read_text().splitlines()


# ----------------------------------------------------------------------------- tune, rebuild


def test_log_is_tvm_json_database_describing_its_workloads(tuned_log):
    workloads = [json.loads(line) for line in lines(tuned_log / WORKLOADS)]
    tuning_records = [json.loads(line) for line in lines(tuned_log / RECORDS)]
    assert len(workloads) == 2 and len(tuning_records) == sum(TUNED.values())
    metas = [w.meta for w in read_log(tuned_log)]
    assert sorted(m["kernel"] for m in metas) == sorted(TUNED)
    assert {m["arch"] for m in metas} == {arch_name(TARGET)} and all(m["bucket"]["seq_len"] == 128 for m in metas)
    # TVM reads it back: every record replays through its own database
    database = ms.database.JSONDatabase(work_dir=str(tuned_log))
    assert len(database.get_all_tuning_records()) == len(tuning_records)
    decisions = [json.dumps([r[0], r[1][0][1]]) for r in tuning_records]  # (workload, sampled knob values)
    assert len(set(decisions)) == len(decisions)  # no candidate measured twice


def test_rebuild_from_log_matches_reference_and_hand_build(tuned_log, rng):
    with pytest.warns(TuningNotice, match="has no record for"):
        assert sorted(tuned_kernels(tuned_log, small_funcs(), TARGET)) == sorted(TUNED)
    with pytest.warns(TuningNotice) as notices:
        tuned = TurboAttention.build("llvm", head_dims=(64,), dtypes=("float32",), tuning_log=tuned_log.parent)
    assert len([n for n in notices if issubclass(n.category, TuningNotice)]) == 1  # one line per build
    assert "hand schedule for" in str(notices[0].message)
    hand = TurboAttention(build("llvm", SMALL))

    q, k, v = random_qkv(rng, 1, 4, 2, 150, 150, 64)
    out = tuned.prefill(q, k, v, causal=True)
    assert cosine(out, ref.turbo_prefill(q, k, v, causal=True)) >= 0.9999
    assert np.allclose(out, hand.prefill(q, k, v, causal=True), atol=1e-5)
    x = torch.from_numpy(q)
    codes, scale = tuned.quantize(x, "float32")
    hand_codes, hand_scale = hand.quantize(x, "float32")
    assert torch.equal(codes, hand_codes) and torch.equal(scale, hand_scale)
    ref_codes, ref_scale = ref.quantize_int8(q)
    assert np.abs(codes.numpy().astype(int) - ref_codes).max() <= 1 and np.allclose(scale.numpy(), ref_scale)


def test_cache_key_includes_log_content(tuned_log, log_copy):
    plain = cache_key("llvm", SMALL)
    keyed = cache_key("llvm", SMALL, tuning_log=log_copy)
    assert "tuning_log_sha256" not in plain and keyed["tuning_log_sha256"]
    assert cache_key("llvm", SMALL, tuning_log=log_copy.parent) == keyed  # <root>/<arch> resolves to the same log
    with open(log_copy / RECORDS, "a") as f:
        f.write(lines(log_copy / RECORDS)[0] + "\n")
    retuned = cache_key("llvm", SMALL, tuning_log=log_copy)
    assert retuned["tuning_log_sha256"] != keyed["tuning_log_sha256"]
    assert len({entry_name("llvm", SMALL, k) for k in (plain, keyed, retuned)}) == 3


def test_xz_compressed_log_builds_the_same_and_resumes(log_copy):
    """Shipped logs keep the workload file xz-compressed; lookup reads it, tuning expands it to resume."""
    import lzma

    with pytest.warns(TuningNotice):
        plain = {n: f.script() for n, f in tuned_kernels(log_copy, small_funcs(), TARGET).items()}
    key = cache_key("llvm", SMALL, tuning_log=log_copy)["tuning_log_sha256"]
    (log_copy / (WORKLOADS + ".xz")).write_bytes(lzma.compress((log_copy / WORKLOADS).read_bytes()))
    (log_copy / WORKLOADS).unlink()
    with pytest.warns(TuningNotice):
        compressed = {n: f.script() for n, f in tuned_kernels(log_copy, small_funcs(), TARGET).items()}
    assert compressed == plain and sorted(compressed) == sorted(TUNED)
    assert cache_key("llvm", SMALL, tuning_log=log_copy)["tuning_log_sha256"] != key  # the file differs
    (result,) = quick_tune(log_copy, ["quantize_float32"], TUNED["quantize_float32"])
    assert result.new_trials == 0 and (log_copy / WORKLOADS).is_file()  # expanded, nothing re-measured
    (log_copy / WORKLOADS).unlink()
    (log_copy / (WORKLOADS + ".xz")).write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(TuningLogError, match=r"database_workload.json.xz: not a complete xz file"):
        schedule_module(small_funcs(), TARGET, tuning_log=log_copy)


# ----------------------------------------------------------------------------- missing and bad logs


def test_missing_log_gives_one_notice_and_hand_schedules(tmp_path):
    with pytest.warns(TuningNotice, match=f"no tuning log for {arch_name(TARGET)}") as notices:
        schedule_module(small_funcs(), TARGET, tuning_log=tmp_path)
    assert len(notices) == 1
    with pytest.raises(FileNotFoundError, match="tuning_log: .* does not exist"):
        schedule_module(small_funcs(), TARGET, tuning_log=tmp_path / "nothing")


def test_stale_record_counts_as_none(log_copy, monkeypatch):
    from turbotvm.tuning import lookup

    monkeypatch.setattr(lookup, "kernel_fingerprint", lambda func: "edited-kernel")
    with pytest.warns(TuningNotice, match="with records for older kernel code"):
        assert tuned_kernels(log_copy, small_funcs(), TARGET) == {}


def rewrite_workload(log_dir, change_meta=None, drop_attr=False):
    """Re-encode the first workload with its turbotvm attribute edited (or removed)."""
    entry = json.loads(lines(log_dir / WORKLOADS)[0])
    func = ms.database.Workload.from_json(entry).mod["main"]
    if drop_attr:
        func = func.without_attr(ATTR)
    else:
        meta = json.loads(str(func.attrs[ATTR]))
        change_meta(meta)
        func = func.with_attr(ATTR, json.dumps(meta))
    new = ms.database.Workload(tvm.IRModule({"main": func})).as_json()
    rest = lines(log_dir / WORKLOADS)[1:]
    (log_dir / WORKLOADS).write_text("\n".join([json.dumps(list(new))] + rest) + "\n")


DAMAGES = {
    "garbage record": (lambda d: (d / RECORDS).write_text(lines(d / RECORDS)[0] + "\n{not json\n"),
                       rf"{RECORDS}:2: invalid JSON"),
    "truncated workload": (lambda d: (d / WORKLOADS).write_text(lines(d / WORKLOADS)[0][:200] + "\n"),
                           rf"{WORKLOADS}:1: invalid JSON"),
    "bad base64": (lambda d: (d / WORKLOADS).write_text('["1", "not base64 !"]\n'), rf"{WORKLOADS}:1: .*base64"),
    "record of no workload": (lambda d: (d / RECORDS).write_text("[7, [[[], []], [0.1], {\"kind\": \"llvm\"}, []]]\n"),
                              rf"{RECORDS}:1: workload index 7 is outside"),
    "negative run time": (lambda d: (d / RECORDS).write_text("[0, [[[], []], [-1], {\"kind\": \"llvm\"}, []]]\n"),
                          rf"{RECORDS}:1: run_secs"),
    "other TVM": (lambda d: rewrite_workload(d, lambda m: m.update(tvm="0.19.0")),
                  rf"{WORKLOADS}:1: tuned with TVM 0.19.0, this is TVM"),
    "other format": (lambda d: rewrite_workload(d, lambda m: m.update(format="turbotvm-tuning/9")),
                     rf"{WORKLOADS}:1: written as format 'turbotvm-tuning/9'"),
    "another tool's log": (lambda d: rewrite_workload(d, drop_attr=True), rf"{WORKLOADS}:1: not a turbotvm workload"),
    "records without workloads file": (lambda d: (d / RECORDS).unlink(), rf"{RECORDS}: missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_bad_log_is_an_error_naming_file_and_line(log_copy, damage):
    spoil, message = DAMAGES[damage]
    spoil(log_copy)
    with pytest.raises(TuningLogError, match=message) as error:
        schedule_module(small_funcs(), TARGET, tuning_log=log_copy)
    assert str(log_copy) in str(error.value)


def test_trace_that_does_not_replay_is_an_error(log_copy, monkeypatch):
    """A record whose trace does not fit the kernel (same hash claimed) is refused, never half-applied."""
    from turbotvm.tuning import lookup

    prefill = "prefill_causal_d64_float32"
    wrong = {prefill: small_funcs()["quantize_float32"]}  # another kernel under the logged name
    logged = {w.meta["kernel"]: w for w in read_log(log_copy)}
    monkeypatch.setattr(lookup, "kernel_fingerprint", lambda func: logged[prefill].meta["kernel_hash"])
    with pytest.raises(TuningLogError, match=rf"{RECORDS}:\d+: the record for {prefill} does not apply"):
        tuned_kernels(log_copy, wrong, TARGET)


# ----------------------------------------------------------------------------- resume, CLI, RPC


def test_cli_resume_continues_without_repeating(log_copy, capsys):
    before = len(lines(log_copy / RECORDS))
    args = ["tune", "--target", "llvm", "--kernels", "quantize", "--only", "quantize_float32", "--head-dims", "64",
            "--dtypes", "float32", "--heads", "4", "--kv-heads", "2", "--seq-len", "128", "--population", "16", "--out", str(log_copy)]
    assert cli_main(args + ["--trials", str(TUNED["quantize_float32"] + 1)]) == 0
    output = capsys.readouterr().out
    assert "quantize_float32" in output and "speedup" in output
    after = [json.loads(line) for line in lines(log_copy / RECORDS)]
    assert len(after) == before + 1
    quantize_index = [w.meta["kernel"] for w in read_log(log_copy)].index("quantize_float32")
    decisions = [json.dumps(r[1][0][1]) for r in after if r[0] == quantize_index]
    assert len(decisions) == len(set(decisions)) == TUNED["quantize_float32"] + 1
    assert cli_main(args + ["--trials", "2"]) == 0  # already has more: nothing to measure
    assert len(lines(log_copy / RECORDS)) == before + 1


def test_rpc_tracker_on_loopback(tmp_path):
    pytest.importorskip("tornado", reason="the TVM RPC tracker needs tornado")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    port = random.randint(20000, 40000)
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 200, silent=True)
    server = rpc.Server("127.0.0.1", port=tracker.port + 1, port_end=tracker.port + 300,
                        tracker_addr=("127.0.0.1", tracker.port), key="turbotvm-test", silent=True)
    try:
        (result,) = quick_tune(tmp_path / "rpc", ["quantize_float32"], 2,
                               rpc=f"127.0.0.1:{tracker.port}:turbotvm-test")
    finally:
        server.terminate()
        tracker.terminate()
    assert result.new_trials == 2 and result.best_seconds is not None  # measured through the tracker's server
    (logged,) = read_log(tmp_path / "rpc")
    assert len(logged.records) == 2 and logged.best() is not None


def test_rpc_spec_is_checked():
    from turbotvm.tuning.measure import RPCSpec

    assert RPCSpec.parse("10.0.0.2:9190:h200") == ("10.0.0.2", 9190, "h200")
    with pytest.raises(ValueError, match="rpc: expected 'host:port:key'"):
        RPCSpec.parse("10.0.0.2:h200")


# ----------------------------------------------------------------------------- hand-mapped kernels: knob variants


def scale_rows(head_dim: int, lanes: int = 4):
    """A hand-mapped CPU kernel (out = 2 x) whose vector width is a factory parameter: a knob."""

    @T.prim_func(s_tir=True)
    def scale_rows_func(x_h: T.handle, out_h: T.handle):
        N = T.int64()
        x = T.match_buffer(x_h, (N, head_dim), "float32")
        out = T.match_buffer(out_h, (N, head_dim), "float32")
        for i in T.parallel(N):
            for c in range(head_dim // lanes):
                for j in T.vectorized(lanes):
                    with T.sblock("scale"):
                        vi = T.axis.spatial(N, i)
                        vj = T.axis.spatial(head_dim, c * lanes + j)
                        out[vi, vj] = x[vi, vj] * T.float32(2)

    return scale_rows_func


def test_hand_mapped_knob_variants_are_tuned_and_rebuilt(tmp_path, monkeypatch):
    family = variants.HandMappedFamily(r"scale_rows_d(\d+)", scale_rows, lambda m: (int(m[1]),),
                                       knobs={"lanes": (4, 16)})
    monkeypatch.setitem(variants.FAMILIES, "scale_rows", family)
    monkeypatch.setitem(variants.KNOBS, "scale_rows", family.knobs)
    from turbotvm.tuning.measure import make_builder, make_runner

    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    result = variants.tune_variants("scale_rows_d64", TARGET, SMALL, BUCKET, 64, database, make_builder(),
                                    make_runner(), trials=8, progress=None)
    assert result.trials == result.new_trials == 2 and result.baseline_seconds is not None
    again = variants.tune_variants("scale_rows_d64", TARGET, SMALL, BUCKET, 64, database, make_builder(),
                                   make_runner(), trials=8, progress=None)
    assert again.new_trials == 0  # both settings are logged

    (logged,) = read_log(tmp_path)
    best_line, _, _ = logged.best()
    func = scale_rows(64).with_attr("global_symbol", "scale_rows_d64").with_attr(HAND_MAPPED, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningNotice)
        rebuilt = tuned_kernels(tmp_path, {"scale_rows_d64": func}, TARGET)["scale_rows_d64"]
    best_lanes = variants.setting_from_trace(
        ms.database.TuningRecord.from_json(json.loads(lines(tmp_path / RECORDS)[best_line - 1])[1],
                                           ms.database.Workload.from_json(logged.json_obj)).trace,
        ms.database.Workload.from_json(logged.json_obj).mod)["lanes"]
    assert best_lanes in (4, 16) and f"T.vectorized({best_lanes})" in rebuilt.script()  # the logged variant
    # 64-byte aligned, as TVM's kernels assume: the 16-lane variant's AVX-512 loads faulted on numpy's
    # 16-byte aligned data (a segfault in some runs, 2026-12-03; turbotvm's entry points copy such inputs)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)).clone()
    out = torch.empty_like(x)
    tvm.compile(tvm.IRModule({"scale_rows_d64": rebuilt}), target=TARGET)["scale_rows_d64"](x, out)
    assert torch.equal(out, 2 * x)


CUDA_SM90 = make_target({"kind": "cuda", "arch": "sm_90"})
PREFILL_SETTINGS = [({"warps": 4, "min_blocks": 0}, 2e-3), ({"warps": 2, "min_blocks": 0}, 3e-3)]


def test_shipped_sm90_log_is_fresh_for_these_kernels():
    """tuning_logs/sm_90 holds no record for older CUDA kernel code: a kernel change needs a re-tune or
    a prune. Whatever kernels it holds records for (since 2026-12-07: the prefill kernels, tuned on an H100;
    the decode steps' records were pruned when their softmax changed), the rest build their hand schedules."""
    from pathlib import Path

    from turbotvm.tuning.lookup import prune_stale

    shipped = Path(__file__).resolve().parent.parent / "tuning_logs" / "sm_90"
    funcs = make_kernel_set(KernelSetConfig((64, 128), ("float16",)), "cuda").funcs
    logged = {w.meta["kernel"] for w in read_log(shipped)}
    assert logged <= set(funcs)
    with pytest.warns(TuningNotice, match=rf"has no record for {len(funcs) - len(logged)} of {len(funcs)} kernels;"):
        tuned_kernels(shipped, funcs, CUDA_SM90)  # the count would add "(N with records for older kernel code)"
    assert prune_stale(shipped, funcs, CUDA_SM90) == 0  # nothing to drop: the file is left as it is


def write_prefill_log(log_dir, funcs):
    """An sm_90 log of the current prefill_tc kernels, two knob settings each, for lookup and pruning
    tests (the run seconds are made up: nothing here runs on a GPU), its workloads xz-compressed as shipped."""
    import lzma

    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from turbotvm.tuning.workload import head_dim_of, tuning_workload

    log_dir.mkdir(parents=True)
    database = ms.database.JSONDatabase(work_dir=str(log_dir))
    for name in (n for n in funcs if n.startswith("prefill_tc_")):
        family = variants.family_of(name)
        workload = tuning_workload(name, funcs[name], CUDA_SM90, ShapeBucket(1, 32, 32, 16384),
                                   head_dim_of(name, (64, 128)))
        for setting, seconds in PREFILL_SETTINGS:
            trace = variants.knob_trace(workload, family, setting).trace
            database.commit_tuning_record(ms.database.TuningRecord(
                trace, database.commit_workload(workload), [seconds], CUDA_SM90,
                ArgInfo.from_entry_func(workload, remove_preproc=True)))
    plain = log_dir / WORKLOADS
    with lzma.open(log_dir / (WORKLOADS + ".xz"), "wt", preset=1) as f:
        f.write(plain.read_text())
    plain.unlink()


def test_prune_stale_drops_only_older_kernel_code(tmp_path):
    """After a kernel change, re-tuning leaves the old code's workloads behind: pruning drops exactly those
    (records re-indexed, xz kept), and lookup still finds every other kernel's best record."""
    from turbotvm.kernels.prefill_tc import prefill_tc
    from turbotvm.tuning.lookup import prune_stale

    log = tmp_path / "sm_90"
    funcs = make_kernel_set(KernelSetConfig((64, 128), ("float16",)), "cuda").funcs
    write_prefill_log(log, funcs)
    before = read_log(log)
    assert len(before) == 4 and all(len(w.records) == 2 for w in before)
    assert prune_stale(log, funcs, CUDA_SM90) == 0  # a log of the current code
    with pytest.warns(TuningNotice, match=f"has no record for {len(funcs) - 4} of {len(funcs)} kernels;"):
        tuned = tuned_kernels(log, funcs, CUDA_SM90)
    assert sorted(tuned) == sorted(n for n in funcs if n.startswith("prefill_tc_"))
    assert all(f.attrs[HAND_MAPPED] for f in tuned.values())
    changed = "prefill_tc_full_d128_float16"  # "new code": another warps default
    funcs[changed] = prefill_tc(128, False, "float16", warps=2).with_attr("global_symbol", changed) \
        .with_attr(HAND_MAPPED, True)
    logged_changed = [w for w in before if w.meta["kernel"] == changed]
    assert prune_stale(log, funcs, CUDA_SM90) == len(logged_changed) == 1
    after = read_log(log)  # every line re-checked, record indices in range
    assert (log / "database_workload.json.xz").is_file() and not (log / "database_workload.json").exists()
    assert [w.json_obj for w in after] == [w.json_obj for w in before if w.meta["kernel"] != changed]
    assert [[r[2] for r in w.records] for w in after] == \
        [[r[2] for r in w.records] for w in before if w.meta["kernel"] != changed]
    with pytest.warns(TuningNotice, match=f"has no record for {len(funcs) - 3} of {len(funcs)} kernels;"):  # changed: none
        tuned = tuned_kernels(log, funcs, CUDA_SM90)
    assert changed not in tuned and "prefill_tc_causal_d128_float16" in tuned
