"""Codegen: CUDA source without a GPU, nvcc on it, export -> load in a new process, bad module files."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from turbotvm.codegen import emit_cuda_source, export, load
from turbotvm.codegen.export import MANIFEST
from turbotvm.kernel_set import KERNEL_ABI, KernelSetConfig


@pytest.fixture(scope="module")
def cuda_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "kernels.cu"
    return path, emit_cuda_source("sm_90", KernelSetConfig(head_dims=(64, 128), dtypes=("float16",)), path)


@pytest.fixture(scope="module")
def cuda_ptx(cuda_source):
    """The emitted source through nvcc's front end once (sm_90a PTX), for the tests that read the PTX or
    run ptxas on it."""
    path, _ = cuda_source
    ptx = path.with_suffix(".ptx")
    result = subprocess.run(["nvcc", "-ptx", "-arch=sm_90a", str(path), "-o", str(ptx)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return ptx


def test_cuda_source_has_every_kernel(cuda_source):
    _, source = cuda_source
    for name in ("prefill_tc_causal_d128_float16", "prefill_tc_full_d64_float16", "quantize_vt_float16_d128",
                 "quantize_rows_smoothed_float16_d64", "decode_step_b4_d128_float16",
                 "decode_step_b2_d64_float16", "compress_v_b2", "quantize_rows_float16_d128",
                 "quantize_rows_balanced_float16_d64", "channel_smoothing_float16"):
        assert f"{name}_kernel" in source, name
    # the generic quantize kernels (one thread per 64-token block under the SIMT rule) are CPU-only
    assert "quantize_smoothed_float16_kernel" not in source and "quantize_float16_kernel" not in source


def test_cuda_prefill_runs_on_int8_tensor_cores(cuda_source):
    _, source = cuda_source
    for name, mmas in (("prefill_tc_causal_d128_float16", 66), ("prefill_tc_full_d64_float16", 34)):
        start = source.index(f"{name}_kernel(", source.index(f"{name}_kernel(") + 1)  # after the declaration
        body = source[start: source.index("\n}\n", start)]
        # Q·Kᵀ, P·V and P's row sums (P·1), fully unrolled: 64/8 key tiles * D/32 + D/8 * 64/32 + 64/32
        # m16n8k32 per KV tile
        assert body.count("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32") == mmas, name
        assert "__shared__" in body and "warp_reduce_max_4" in body, name  # row max over 4 lanes


def test_cuda_decode_step_reads_tiles_by_the_copy_engine(cuda_source):
    """Each tile: one mbarrier expect_tx of the tile's bytes and six bulk copies (K, V codes; their steps
    and zeros), at the ring's warm-up and in the tile loop; no global loads of codes by the threads."""
    _, source = cuda_source
    for name, tile_bytes in (("decode_step_b4_d128_float16", 9472), ("decode_step_b2_d64_float16", 2816)):
        start = source.index(f"{name}_kernel(", source.index(f"{name}_kernel(") + 1)  # after the declaration
        body = source[start: source.index("\n}\n", start)]
        expects = body.count("expect_tx_shared_b64(") - body.count("expect_tx_shared_b64(uint32_t")
        copies = body.count("mbarrier__complete_tx__bytes(") - body.count("mbarrier__complete_tx__bytes(uint32_t")
        assert expects >= 2 and copies == 6 * expects, name
        assert f"(uint){tile_bytes})" in body and "tvm_builtin_cuda_mbarrier_wait(" in body, name
        assert "k_codes_ptr[" not in body.replace("(&(k_codes_ptr[", ""), name  # addresses only
        # one launch per step: the head's last CTA (by an atomic count) merges the slots, read through L2
        assert body.count("atomicAdd(") == 1 and "__threadfence()" in body and "__ldcg(" in body, name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_decode_step_takes_no_ieee_division_per_tile(cuda_ptx):
    """An IEEE float division is a check, a Newton step and a slow-path call. The decode step's tiles
    take P's scale by a product and its inverse by MUFU.RCP (div.approx, at the packed and the INT8
    tiles' softmax and one more inlined copy); its IEEE divisions are q's quantization (two, bit for bit
    with quantize_rows) and the merge's one per output. There were two more per tile."""
    entries = {entry.split("(")[0]: entry for entry in cuda_ptx.read_text().split(".entry ")[1:]}
    steps = [name for name in entries if name.startswith("decode_step_")]
    assert len(steps) == 4, sorted(entries)
    for name in steps:
        counts = {op: len(re.findall(re.escape(op) + r"\b", entries[name])) for op in ("div.rn.f32", "div.approx.f32")}
        assert counts == {"div.rn.f32": 3, "div.approx.f32": 3}, (name, counts)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_decode_step_keeps_eight_ctas_per_sm(cuda_ptx, tmp_path):
    """The split count assumes 8 step CTAs per SM: at most 64 registers (no spills) and a ring that
    fits 8 CTAs' shared memory, for every head dim and bit width (ptxas -v on the emitted source's PTX)."""
    result = subprocess.run(["ptxas", "-arch=sm_90a", "-v", str(cuda_ptx), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = {}  # kernel -> (spill bytes, registers, shared memory bytes)
    for chunk in result.stderr.split("Compiling entry function '")[1:]:
        name = chunk.split("'")[0]
        spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill", chunk))
        smem = re.search(r"(\d+) bytes smem", chunk)
        report[name] = (spills, int(re.search(r"Used (\d+) registers", chunk)[1]), int(smem[1]) if smem else 0)
    steps = {name: usage for name, usage in report.items() if name.startswith("decode_step_")}
    assert len(steps) == 4, sorted(report)
    for name, (spills, registers, smem) in steps.items():
        assert registers <= 64 and spills == 0, (name, registers, spills)
        assert 8 * (smem + 1024) <= 228 * 1024, (name, smem)


def test_decode_timeline_instruments_this_step_kernel():
    """benchmarks/decode_timeline.py edits decode_cuda.py's text at five lines; a change to those lines must
    show here, not on the GPU machine: the instrumented kernel has the five stamps and the extra argument."""
    import importlib.util
    from pathlib import Path

    import tvm

    from turbotvm.kernels import decode_cuda

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_timeline.py"
    spec = importlib.util.spec_from_file_location("decode_timeline", path)
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)
    module = timeline.instrumented_module(Path(decode_cuda.__file__))
    func = module.decode_step_cuda(128, 4, "float16")
    assert len(func.params) == len(decode_cuda.decode_step_cuda(128, 4, "float16").params) + 1
    mod = tvm.IRModule({"step": func.with_attr("global_symbol", "step")})
    source = tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"})).mod.imports[0].inspect_source()
    assert source.count("tvm_builtin_timer_start_cuda(") == 1 + 5  # the helper's definition and five calls


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_decode_step_before_sm90_loads_by_threads(tmp_path):
    """sm_80/sm_89 have no bulk copies or mbarrier transactions: their step kernels load the codes
    by the threads, and compile for their arch."""
    import tvm

    from turbotvm.kernel_set import KernelSetConfig, make_kernel_set

    for arch, bulk in (("sm_80", False), ("sm_89", False), ("sm_90", True), ("sm_90a", True), (None, True)):
        funcs = make_kernel_set(KernelSetConfig((64, 128), ("float16",)), "cuda", arch).funcs
        assert ('"async", "bulk"' in funcs["decode_step_b4_d128_float16"].script()) == bulk, arch
    funcs = {n: f for n, f in make_kernel_set(KernelSetConfig((64, 128), ("float16",)), "cuda", "sm_80").funcs.items()
             if n.startswith("decode_step_b")}
    source = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) \
        .mod.imports[0].inspect_source()
    assert "mbarrier" not in source and "bulk" not in source
    (tmp_path / "k.cu").write_text(source)
    result = subprocess.run(["nvcc", "-arch=sm_80", "-c", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_v8t_key_order_is_a_permutation_and_its_inverse():
    from turbotvm.kernels.prefill_tc import key_position
    from turbotvm.kernels.quantize_cuda import key_at

    positions = [key_position(k) for k in range(64)]
    assert sorted(positions) == list(range(64))
    assert [key_at(p) for p in positions] == list(range(64))
    # lane t=1 holds keys {2, 3, 10, 11} in its accumulator: they are the 4 bytes of its first A word,
    # and its words (k-step 0: 0-15 / 16-31, k-step 1: ...) lie side by side at word 4 = column 16
    assert [positions[k] for k in (2, 3, 10, 11)] == [16, 17, 18, 19]
    assert [positions[k] for k in (18, 19, 26, 27)] == [20, 21, 22, 23]
    assert [positions[k] for k in (34, 35, 42, 43)] == [24, 25, 26, 27]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_with_nvcc_sm90(cuda_source, tmp_path):
    path, _ = cuda_source
    result = subprocess.run(["nvcc", "-arch=sm_90", "-c", str(path), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


LOAD_AND_RUN = """
import sys, numpy as np
from turbotvm import TurboAttention
turbo = TurboAttention.load(sys.argv[1])
data = np.load(sys.argv[2])
out = turbo.prefill(data["q"], data["k"], data["v"], causal=True)
np.save(sys.argv[3], out)
"""


def test_export_load_in_new_process_bit_identical(turbo_cpu, rng, tmp_path):
    module_dir = export(turbo_cpu.kernels, tmp_path / "module")
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(1, 4, 100, 64), (1, 2, 100, 64), (1, 2, 100, 64)])
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v)
    subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(module_dir), str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npy")], check=True, timeout=300)
    here = turbo_cpu.prefill(q, k, v, causal=True)
    assert np.array_equal(np.load(tmp_path / "out.npy"), here)


@pytest.fixture
def exported(turbo_cpu, tmp_path):
    return export(turbo_cpu.kernels, tmp_path / "module")


def test_loaded_module_refuses_unbuilt_head_dim(exported, rng):
    from turbotvm import TurboAttention

    turbo = TurboAttention.load(exported)
    q = rng.standard_normal((1, 2, 8, 96)).astype(np.float32)
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        turbo.prefill(q, q, q)
    with pytest.raises(TypeError, match="expected dtype in"):
        turbo.prefill(*(rng.standard_normal((1, 2, 8, 64)).astype(np.float16),) * 3)


def test_corrupt_library_is_refused(exported):
    library = exported / "kernels.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        load(exported)


def test_truncated_library_is_refused(exported):
    library = exported / "kernels.so"
    library.write_bytes(library.read_bytes()[:1000])
    with pytest.raises(ValueError, match="checksum differs"):
        load(exported)


def test_foreign_file_as_module_is_refused(exported):
    (exported / MANIFEST).write_text("this is not json")
    with pytest.raises(ValueError, match="not a turbotvm manifest"):
        load(exported)
    (exported / MANIFEST).write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ValueError, match="expected format 'turbotvm-module/1'"):
        load(exported)


def test_library_that_is_not_a_shared_object_is_refused(exported):
    manifest = json.loads((exported / MANIFEST).read_text())
    (exported / "kernels.so").write_bytes(b"not an ELF file")
    import hashlib

    manifest["sha256"] = hashlib.sha256(b"not an ELF file").hexdigest()
    (exported / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="TVM could not load it"):
        load(exported)


def test_other_tvm_version_is_refused(exported):
    manifest = json.loads((exported / MANIFEST).read_text())
    manifest["versions"]["tvm"] = "0.1.0"
    (exported / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="built with TVM 0.1.0"):
        load(exported)


@pytest.mark.parametrize("abi", [None, 1, 2, 3])  # None: an export from before the field (version 1)
def test_other_kernel_abi_is_refused(exported, abi):
    """Kernels of another ABI take other arguments or cache layouts: used with this Python, they would
    fail on a missing name or, worse, compute on misread codes."""
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["kernel_abi"] == KERNEL_ABI
    if abi is None:
        del manifest["kernel_abi"]
    else:
        manifest["kernel_abi"] = abi
    (exported / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"kernel ABI {abi or 1}, this turbotvm's is {KERNEL_ABI}"):
        load(exported)


def test_missing_module_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="module_dir: expected"):
        load(tmp_path / "nothing")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_every_cuda_knob_setting_compiles_for_sm90():
    """Tuning measures every knob setting: each must compile (registers, shared memory) for sm_90."""
    import tvm

    from turbotvm.tuning.variants import FAMILIES, _registry, settings_of

    _registry()
    names = {"prefill_tc": "prefill_tc_causal_d128_float16", "decode_step_cuda": "decode_step_b4_d128_float16"}
    funcs = {}
    for family_name, kernel in names.items():
        family = FAMILIES[family_name]
        assert len(family.knobs) >= 1, family_name
        for i, setting in enumerate(settings_of(family)):
            funcs[f"{family_name}_{i}"] = family.make(kernel, setting).with_attr("global_symbol", f"{family_name}_{i}")
    assert len(funcs) == 3 * 3 + 4
    source = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"})) \
        .mod.imports[0].inspect_source()
    for name in funcs:
        assert f"{name}_kernel" in source
    # settings in order (warps, min_blocks): (4, hand = 1 at D=128), (4, 1), (4, 3), (2, ...), (8, ...)
    launch_bounds = source.replace("void ", "")
    assert "__launch_bounds__(128, 1) prefill_tc_0_kernel" in launch_bounds
    assert "__launch_bounds__(128, 3) prefill_tc_2_kernel" in launch_bounds
    assert "__launch_bounds__(256, 1) prefill_tc_6_kernel" in launch_bounds
    # decode's stages (hand = 2 for 4-bit D=128, 2, 3, 4): rings of 9472-byte tiles, in 4-byte words
    assert all(f"int ring_ptr[{2368 * stages}];" in source for stages in (2, 3, 4))


def test_module_for_another_cpu_is_refused(exported):
    """A CPU build uses this machine's instruction set (mcpu); a module whose CPU has features this one lacks
    is refused before its library is opened, instead of dying on an illegal instruction."""
    manifest = json.loads((exported / MANIFEST).read_text())
    assert json.loads(manifest["target"]).get("mcpu")  # 'llvm' built for this CPU
    manifest["target"] = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1"})
    (exported / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="whose instructions this CPU lacks"):
        load(exported)


def test_warp_max_order_key_keeps_float_order():
    """The CUDA decode's warp max runs redux.sync (integers only) on int32 keys of the scores: the keys
    must order like the floats, negatives and the NEG_BIG of masked tokens included, and map back exactly."""
    import tvm
    from tvm.script import tirx as T

    from turbotvm.kernels.decode_cuda import _order_key
    from turbotvm.kernels.sas import NEG_BIG

    n = 4096
    floats = np.random.default_rng(0).standard_normal(n).astype(np.float32) * np.float32(10.0) ** \
        np.random.default_rng(1).integers(-30, 30, n).astype(np.float32)
    floats[:6] = [NEG_BIG, -0.0, 0.0, 1e-40, -1e-40, 3.0e38]

    @T.prim_func(s_tir=True)
    def keys(x: T.Buffer((n,), "float32"), key: T.Buffer((n,), "int32"), back: T.Buffer((n,), "float32")):
        for i in range(n):
            with T.sblock("key"):
                vi = T.axis.remap("S", [i])
                key[vi] = _order_key(T.reinterpret("int32", x[vi]))
                back[vi] = T.reinterpret("float32", _order_key(_order_key(T.reinterpret("int32", x[vi]))))

    key, back = np.empty(n, np.int32), np.empty(n, np.float32)
    tvm.compile(tvm.IRModule({"keys": keys.with_attr("global_symbol", "keys")}), target="llvm")["keys"](floats, key, back)
    assert np.array_equal(back.view(np.int32), floats.view(np.int32))  # its own inverse, bit for bit
    by_key = floats[np.argsort(key, kind="stable")]
    assert np.all(np.diff(by_key.astype(np.float64)) >= 0)  # ascending keys = ascending floats
    assert floats[np.argmax(key)] == floats.max() and floats[np.argmin(key)] == floats.min()
