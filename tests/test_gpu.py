"""CUDA build on a real GPU (tensor-core prefill, SIMT decode): same numbers as the reference. Runs on the device."""

import numpy as np
import pytest
import torch

from turbotvm import TurboAttention
from turbotvm import reference as ref
from turbotvm.testing import check_compress_bit_exact, cosine, random_qkv, realistic_qkv

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def turbo_cuda():
    return TurboAttention.build({"kind": "cuda", "arch": "sm_90"}, head_dims=(64, 128), dtypes=("float32", "float16", "bfloat16"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_cuda_matches_reference(turbo_cuda, rng, dtype, causal):
    q, k, v = realistic_qkv(rng, 1, 8, 2, 333, 333, 128, dtype=dtype)
    out = turbo_cuda.prefill(*(torch.from_numpy(x).cuda() for x in (q, k, v)), causal=causal)
    torch.cuda.synchronize()
    out = out.float().cpu().numpy()
    min_ref = 0.9999 if dtype == "float32" else 0.999  # fp16 output rounding
    assert cosine(out, ref.turbo_prefill(q, k, v, causal)) >= min_ref
    assert cosine(out, ref.exact_attention(q, k, v, causal)) >= 0.995


@pytest.mark.parametrize("shape,causal,dtype", [
    ((2, 8, 8, 64, 64, 64), False, "bfloat16"),     # one tile, MHA, D=64
    ((1, 4, 1, 1, 200, 64), True, "float16"),       # one query row (decode-like) over 200 keys
    ((1, 4, 2, 100, 333, 128), True, "float16"),    # N < M: bottom-right causal
    ((1, 4, 2, 130, 70, 64), True, "float16"),      # N > M: the first 60 rows see nothing -> 0
    ((1, 8, 8, 2048, 2048, 128), True, "float16"),  # long causal
    ((2, 6, 3, 517, 1029, 128), False, "bfloat16"), # odd lengths, GQA 2
])
def test_prefill_tensor_cores_shapes(turbo_cuda, rng, shape, causal, dtype):
    b, h, hkv, n, m, d = shape
    q = rng.standard_normal((b, h, n, d))
    k, v = rng.standard_normal((b, hkv, m, d)), rng.standard_normal((b, hkv, m, d))
    torch_dtype = getattr(torch, dtype)
    out = turbo_cuda.prefill(*(torch.from_numpy(x).to("cuda", torch_dtype) for x in (q, k, v)), causal=causal)
    out = out.float().cpu().numpy()
    # the reference sees the same inputs rounded to the kernel's input dtype
    q, k, v = (torch.from_numpy(x).to(torch_dtype).double().numpy() for x in (q, k, v))
    expected = ref.turbo_prefill(q, k, v, causal)
    assert cosine(out, expected) >= 0.999
    assert cosine(out, ref.exact_attention(q, k, v, causal)) >= 0.998
    if n > m and causal:
        np.testing.assert_array_equal(out[:, :, : n - m], 0)


def test_prefill_tensor_core_source(turbo_cuda):
    source = turbo_cuda.kernels.cuda_source()
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in source


@pytest.mark.parametrize("bits", [4, 2])
def test_cuda_compress_kernels_bit_exact(turbo_cuda, rng, bits):
    """Stage 2 on the GPU (step, zero, K's kept outlier channels, codes) equals the integer reference on
    the GPU's own INT8 codes, realistic K with outlier channels."""
    _, k, v = realistic_qkv(rng, 2, 4, 4, 1, 320, 128)
    check_compress_bit_exact(turbo_cuda, torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), bits)


@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim,bits,splits", [
    (2, 8, 4, 1000, 128, [4, 2, 4, 4], 4),      # mixed bits, INT8 tail of 40 tokens
    (1, 4, 4, 8192 + 17, 128, [4, 4, 4, 4], 37),  # many splits, uneven partition
    (3, 6, 2, 640, 64, [2, 4], 1),               # D=64, GQA 3, exact blocks (no tail)
])
def test_decode_cuda_matches_reference(turbo_cuda, rng, batch, heads, kv_heads, length, head_dim, bits, splits):
    q, k, v = realistic_qkv(rng, batch, heads, kv_heads, 1, length, head_dim)
    cache = turbo_cuda.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), bits)
    out = turbo_cuda.decode(torch.from_numpy(q).cuda(), cache, num_splits=splits).cpu().numpy()
    assert cosine(out, ref.turbo_decode(q, ref.build_cache(k, v, bits), num_splits=splits)) >= 0.9999


def test_cuda_long_sequences_keep_every_token_weight(turbo_cuda, rng):
    """8K-16K keys whose V drifts along the sequence: a softmax state that shrank at every tile (it did,
    with SAS(0) < 1) weighs early tokens less, which exact attention and a one-split decode expose."""
    q, k, v = random_qkv(rng, 1, 4, 2, 1024, 8192, 128)
    v = 0.5 * v + np.linspace(-1, 1, 8192)[:, None]
    out = turbo_cuda.prefill(*(torch.from_numpy(x).to("cuda", torch.float16) for x in (q, k, v)))
    q, k, v = (torch.from_numpy(x).half().double().numpy() for x in (q, k, v))
    assert cosine(out.float().cpu().numpy(), ref.exact_attention(q, k, v)) >= 0.998
    q, k, v = random_qkv(rng, 1, 4, 4, 1, 16384 + 17, 128)
    v = (0.5 * v + np.linspace(-1, 1, v.shape[2])[:, None]).astype(np.float32)
    cache = turbo_cuda.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), [4] * 4)
    out = turbo_cuda.decode(torch.from_numpy(q).cuda(), cache, num_splits=1).cpu().numpy()
    assert cosine(out, ref.turbo_decode(q, ref.build_cache(k, v, [4] * 4), num_splits=1)) >= 0.9999


def test_decode_cuda_auto_splits(turbo_cuda, rng):
    """The default split count (filled GPU) changes only how partial states are merged."""
    q, k, v = random_qkv(rng, 1, 8, 8, 1, 4096, 128)
    cache = turbo_cuda.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), [4] * 8)
    out = turbo_cuda.decode(torch.from_numpy(q).cuda(), cache).cpu().numpy()
    assert cosine(out, ref.turbo_decode(q, ref.build_cache(k, v, [4] * 8))) >= 0.9995
    assert cosine(out, ref.exact_attention(q, k, v)) >= 0.98


def test_decode_cuda_mixed_bits_auto_splits_per_launch(turbo_cuda, rng):
    """Each bit width's launch picks splits for its own heads (the 2-bit quarter takes more) and merges
    only its heads' slots: every head matches the reference at its group's split count."""
    head_bits = [2 if h % 4 == 3 else 4 for h in range(16)]
    q, k, v = realistic_qkv(rng, 4, 16, 16, 1, 2048 + 40, 128)
    cache = turbo_cuda.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), head_bits)
    q_cuda = torch.from_numpy(q).cuda()
    splits = {bits: turbo_cuda._auto_splits(q_cuda, cache.packed_len, head_bits.count(bits)) for bits in (2, 4)}
    assert splits[2] > splits[4]  # else this test checks nothing new
    out = turbo_cuda.decode(q_cuda, cache).cpu().numpy()
    reference = ref.build_cache(k, v, head_bits)
    for bits in (2, 4):
        heads = [h for h in range(16) if head_bits[h] == bits]
        expected = ref.turbo_decode(q, reference, num_splits=splits[bits])[:, heads]
        assert cosine(out[:, heads], expected) >= 0.9999


@pytest.mark.parametrize("length", [1, 37, 64, 65, 128, 191])
@pytest.mark.parametrize("head_dim,dtype", [(64, "bfloat16"), (128, "float16")])
def test_decode_cuda_int8_regions(turbo_cuda, rng, length, head_dim, dtype):
    """The step's INT8 CTA attends to the sink and the open block, each present or not (lengths around
    the block edges; below 128 tokens no packed group: a stand-in one), GQA 4."""
    q, k, v = realistic_qkv(rng, 2, 8, 2, 1, length, head_dim)
    q_cuda = torch.from_numpy(q).to("cuda", getattr(torch, dtype))
    cache = turbo_cuda.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), [4, 2])
    out = turbo_cuda.decode(q_cuda, cache, num_splits=3).float().cpu().numpy()
    expected = ref.turbo_decode(q_cuda.double().cpu().numpy(), ref.build_cache(k, v, [4, 2]), num_splits=3)
    assert cosine(out, expected) >= 0.9995  # bf16 / fp16 output rounding


def test_decode_step_counts_reset_and_steps_repeat(turbo_cuda, rng):
    """The head's last CTA merges and sets its count back to zero: steps repeat bit for bit from one
    workspace, eagerly and replayed from a CUDA graph (an all-zero q head included: uniform attention)."""
    q, k, v = realistic_qkv(rng, 3, 8, 2, 1, 64 * 12 + 10, 128)
    q[:, 5] = 0
    q_cuda = torch.from_numpy(q).to("cuda", torch.float16)
    cache = turbo_cuda.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), [4, 2])
    first = turbo_cuda.decode(q_cuda, cache, num_splits=4)
    counters = turbo_cuda._decode_workspace(q_cuda, 4 + 1)[-1]  # the one that call used
    assert counters.shape == (3, 8) and torch.count_nonzero(counters) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = turbo_cuda.decode(q_cuda, cache, num_splits=4)
    for _ in range(3):
        graph.replay()
        assert torch.equal(turbo_cuda.decode(q_cuda, cache, num_splits=4), first)
    torch.cuda.synchronize()
    assert torch.equal(replayed, first)
    expected = ref.turbo_decode(q_cuda.double().cpu().numpy(), ref.build_cache(k, v, [4, 2]), num_splits=4)
    assert cosine(first.float().cpu().numpy(), expected) >= 0.9995


def test_cpu_tensor_refused_by_cuda_build(turbo_cuda, rng):
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 1, 2, 2, 8, 8, 64))
    with pytest.raises(ValueError, match="q: expected a tensor on 'cuda'"):
        turbo_cuda.prefill(q, k, v)
    np.testing.assert_equal(q.device.type, "cpu")


def _with_kernel(turbo, name, func):
    """``turbo`` with kernel ``name`` replaced by ``func`` (a knob variant), compiled on its own."""
    import dataclasses

    import tvm

    executable = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=turbo.kernels.target)
    functions = {n: turbo.kernels[n] for n in turbo.kernels.names}
    functions[name] = executable[name]
    return TurboAttention(dataclasses.replace(turbo.kernels, _functions=functions))


@pytest.mark.parametrize("warps", [2, 8])
@pytest.mark.parametrize("shape,causal", [
    ((1, 4, 2, 333, 517, 128), False),  # odd lengths, GQA
    ((1, 4, 2, 70, 200, 128), True),    # one CTA of 128 rows: warps past N read a clamped Q scale
    ((2, 4, 4, 300, 300, 64), True),
])
def test_prefill_warps_knob_matches_reference(turbo_cuda, rng, warps, shape, causal):
    from turbotvm.kernel_set import prefill_tc_name
    from turbotvm.kernels.prefill_tc import prefill_tc

    b, h, hkv, n, m, d = shape
    variant = _with_kernel(turbo_cuda, prefill_tc_name(d, causal, "float16"), prefill_tc(d, causal, "float16", warps=warps))
    q, k, v = realistic_qkv(rng, b, h, hkv, n, m, d)
    out = variant.prefill(*(torch.from_numpy(x).to("cuda", torch.float16) for x in (q, k, v)), causal=causal)
    q, k, v = (torch.from_numpy(x).half().double().numpy() for x in (q, k, v))
    assert cosine(out.float().cpu().numpy(), ref.turbo_prefill(q, k, v, causal)) >= 0.999


@pytest.mark.parametrize("stages,copy_engine", [(2, True), (3, True), (0, False)])
@pytest.mark.parametrize("splits", [1, 5, 16])
def test_decode_step_variants_match_reference(turbo_cuda, rng, splits, stages, copy_engine):
    """Rings of 2 and 3 tiles, and the pre-sm_90 kernel (threads load the codes); CTAs with 14, 3, 2, 1
    and 0 tiles (16 splits of 14)."""
    from turbotvm.kernel_set import decode_step_name
    from turbotvm.kernels.decode_cuda import decode_step_cuda

    bits = [4, 2, 4, 4]
    variant = turbo_cuda
    for b in (2, 4):
        variant = _with_kernel(variant, decode_step_name(128, b, "float32"),
                               decode_step_cuda(128, b, "float32", stages=stages, copy_engine=copy_engine))
    q, k, v = realistic_qkv(rng, 2, 8, 4, 1, 1000, 128)
    cache = variant.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), bits)
    out = variant.decode(torch.from_numpy(q).cuda(), cache, num_splits=splits).cpu().numpy()
    assert cosine(out, ref.turbo_decode(q, ref.build_cache(k, v, bits), num_splits=splits)) >= 0.9999


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n,d", [(1, 64), (37, 128), (3001, 128), (700, 64)])
def test_channel_smoothing_cuda_matches_reference(turbo_cuda, rng, dtype, n, d):
    """K's channel mean and balance factor from the one-launch CUDA kernel, on K with outlier channels
    and one constant channel (factor 1), against the float64 reference of the same rounded K."""
    _, k, _ = realistic_qkv(rng, 2, 4, 2, 1, n, d)
    k[:, :, :, 5] = 0.75  # a constant channel
    k = torch.from_numpy(k).to("cuda", getattr(torch, dtype))
    mean, factor = turbo_cuda.smoothing(k, dtype)
    expected_mean, expected_factor = ref.smoothing(k.double().cpu().numpy())
    np.testing.assert_allclose(mean.cpu().numpy(), expected_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(factor.cpu().numpy(), expected_factor, rtol=1e-5, atol=1e-5)
    assert np.all(factor[:, :, 5].cpu().numpy() == 1)


def test_demo_gpu_part_builds_checks_and_benchmarks(tmp_path):
    """`turbotvm demo`'s GPU half (README's first command on a GPU): the CUDA build, tuned by the shipped log
    for this GPU's arch, checked against the reference, then the quick benchmark's JSON and plot."""
    import json

    from rich.console import Console

    from turbotvm.demo import _gpu_part, shipped_tuning_log
    from turbotvm.runtimes import default_target

    _gpu_part(Console(), tmp_path, quick=True)
    (result,) = (tmp_path / "bench").glob("attention_*.json")
    data = json.loads(result.read_text())
    log = shipped_tuning_log(default_target("cuda")["arch"])
    assert data["tuning_log"] == (str(log) if log else None)
    assert len(data["prefill"]) == 3 and len(data["decode"]) == 2 and result.with_suffix(".png").is_file()
    assert all(row["cos_vs_sdpa"] >= 0.999 for row in data["prefill"])


def test_cuda_batches_past_the_index_limit_are_split(turbo_cuda, rng, monkeypatch):
    """Prefill, K's smoothing and quantization run batch slice by batch slice where a tensor would pass the
    int32 index range (here a small limit): the same bits as one call, the batch views' addresses included."""
    q, k, v = (torch.from_numpy(x).cuda().half() for x in random_qkv(rng, 5, 4, 2, 70, 130, 64))
    whole = (turbo_cuda.prefill(q, k, v, causal=True), *turbo_cuda.smoothing(k, "float16"))
    whole_cache = turbo_cuda.compress_kv(k, v, [4, 2])
    monkeypatch.setattr(turbo_cuda, "index_limit", 2 * 4 * 130 * 64)
    split = (turbo_cuda.prefill(q, k, v, causal=True), *turbo_cuda.smoothing(k, "float16"))
    split_cache = turbo_cuda.compress_kv(k, v, [4, 2])
    assert all(torch.equal(a, b) for a, b in zip(whole, split))
    assert all(torch.equal(a, b) for g, h in zip(whole_cache.groups, split_cache.groups)
               for a, b in zip(g.tensors(), h.tensors()))
    assert torch.equal(whole_cache.sink_k, split_cache.sink_k) and torch.equal(whole_cache.buffer_v, split_cache.buffer_v)


def test_cuda_appends_equal_one_compression(turbo_cuda, rng):
    """A cache grown token by token on the GPU holds the INT8 codes and scales of one quantization of all its
    tokens (with the prompt's K smoothing): block 0 (the sink) and the open block, bit for bit."""
    from turbotvm import TurboKVCache

    _, k, v = (torch.from_numpy(x).cuda().half() for x in random_qkv(rng, 2, 4, 4, 1, 200, 128))
    cache = TurboKVCache(head_bits=[4, 2, 4, 4], runtime=turbo_cuda)
    cache.append(k[:, :, :100], v[:, :, :100])
    for t in range(100, 200):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    torch.cuda.synchronize()
    # K's smoothing is fixed by the first append (the prompt), so compress with it
    once = turbo_cuda.compress_kv(k, v, [4, 2, 4, 4])
    mean, factor = turbo_cuda.smoothing(k[:, :, :100].contiguous(), "float16")
    k8, k_scale = turbo_cuda.quantize(k, "float16", (mean, factor))
    assert torch.equal(cache.sink_k, k8[:, :, :64]) and torch.equal(cache.buffer_k, k8[:, :, 192:])
    assert torch.equal(cache.buffer_k_scale, k_scale[:, :, 3:])
    assert once.buffer_v.shape == cache.buffer_v.shape and torch.equal(once.buffer_v, cache.buffer_v)
