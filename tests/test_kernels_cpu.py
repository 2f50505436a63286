"""CPU (LLVM) kernels against the float64 reference of the same algorithm and against exact attention."""

import numpy as np
import pytest
import torch

from turbotvm import TurboAttention
from turbotvm import reference as ref
from turbotvm.algorithm import QUANT_BLOCK
from turbotvm.calibration import select_head_bits
from turbotvm.testing import check_compress_bit_exact, cosine, max_abs_error, random_qkv, realistic_qkv

SAME_ALGORITHM = 0.9999  # kernel vs reference.py (float32 vs float64 of the same steps)


def check_prefill(turbo, q, k, v, causal, min_exact):
    out = turbo.prefill(q, k, v, causal=causal)
    expected = ref.turbo_prefill(q, k, v, causal)
    exact = ref.exact_attention(q, k, v, causal)
    print(f"vs reference cos={cosine(out, expected):.8f} max|err|={max_abs_error(out, expected):.2e}; "
          f"vs exact cos={cosine(out, exact):.6f}")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert cosine(out, expected) >= SAME_ALGORITHM
    assert max_abs_error(out, expected) < 0.05 * np.abs(exact).max()
    assert cosine(out, exact) >= min_exact
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_random(turbo_cpu, rng, head_dim, causal):
    q, k, v = random_qkv(rng, 2, 4, 4, 193, 193, head_dim)
    check_prefill(turbo_cpu, q, k, v, causal, 0.999)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_prefill_gqa_odd_lengths(turbo_cpu, rng, kv_heads):
    q, k, v = random_qkv(rng, 1, 6, kv_heads, 77, 130, 64)
    check_prefill(turbo_cpu, q, k, v, False, 0.999)
    check_prefill(turbo_cpu, q, k, v, True, 0.999)


def test_prefill_outlier_channels(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 1, 8, 2, 384, 384, 128)
    # target 0.995; the reference gives .9996 / .9994 at N = 1000 (10 seeds), .9987 / .9982 before K's balance factor
    check_prefill(turbo_cpu, q, k, v, True, 0.995)
    check_prefill(turbo_cpu, q, k, v, False, 0.995)


def test_prefill_long_sequence(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 2, 1, 4096, 4096, 64)
    check_prefill(turbo_cpu, q, k, v, True, 0.999)


def test_prefill_single_token_and_first_causal_row(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 2, 2, 1, 1, 64)
    out = check_prefill(turbo_cpu, q, k, v, True, 0.999)
    # one visible key: the output is that key's value up to INT8 quantization of V
    np.testing.assert_allclose(out, v, atol=np.abs(v).max() / 127)
    q, k, v = random_qkv(rng, 1, 2, 2, 70, 70, 64)
    out = turbo_cpu.prefill(q, k, v, causal=True)
    np.testing.assert_allclose(out[:, :, 0], v[:, :, 0], atol=np.abs(v[:, :, :64]).max() / 127)


def test_prefill_fully_masked_rows_are_zero(turbo_cpu, rng):
    """N > M with bottom-right causal alignment: the first N - M rows see no key."""
    q, k, v = random_qkv(rng, 1, 2, 2, 100, 30, 64)
    out = check_prefill(turbo_cpu, q, k, v, True, 0.999)
    assert np.all(out[:, :, :70] == 0)
    assert np.all(np.abs(out[:, :, 70:]).sum(-1) > 0)


def test_prefill_torch_tensors_zero_copy(turbo_cpu, rng):
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 1, 2, 2, 64, 64, 64))
    out = turbo_cpu.prefill(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert cosine(out.numpy(), ref.turbo_prefill(q.numpy(), k.numpy(), v.numpy())) >= SAME_ALGORITHM


@pytest.mark.parametrize("bits", [4, 2])
def test_compress_kernels_bit_exact(turbo_cpu, rng, bits):
    _, k, v = realistic_qkv(rng, 2, 4, 4, 1, 256, 128)
    check_compress_bit_exact(turbo_cpu, torch.from_numpy(k), torch.from_numpy(v), bits)


def check_decode(turbo, q, k, v, head_bits, num_splits, min_exact):
    cache = turbo.compress_kv(k, v, head_bits)
    out = turbo.decode(q, cache, num_splits=num_splits)
    expected = ref.turbo_decode(q, ref.build_cache(k, v, head_bits), num_splits=num_splits)
    exact = ref.exact_attention(q, k, v)
    print(f"bits={[int(b) for b in head_bits]} ratio={cache.nbytes() / cache.fp16_nbytes():.3f} vs reference "
          f"cos={cosine(out, expected):.8f} max|err|={max_abs_error(out, expected):.2e}; vs exact cos={cosine(out, exact):.5f}")
    assert out.shape == q.shape
    assert cosine(out, expected) >= SAME_ALGORITHM
    assert cosine(out, exact) >= min_exact
    return cache


def check_4bit_bytes(cache):
    """The issue's 0.3x fp16 bytes for 4-bit: it holds for the 4-bit blocks; the INT8 sink block (64 tokens
    per KV head, a fixed cost) adds about 0.001 at 4K tokens (D=64), less as the cache grows."""
    sink = sum(t.numel() * t.element_size() for t in (cache.sink_k, cache.sink_k_scale, cache.sink_v, cache.sink_v_scale))
    assert sink == cache.k_mean.shape[0] * cache.num_kv_heads * 2 * (64 * cache.head_dim + 4)
    assert cache.nbytes() - sink <= 0.3 * cache.fp16_nbytes()
    assert cache.nbytes() <= 0.3 * cache.fp16_nbytes() + sink


def int8_cache_cosine(q, k, v, num_splits):
    """cos vs exact of decode over the INT8 stage-1 cache alone: the floor that stage 2 builds on."""
    k_mean, k_factor = ref.smoothing(k)
    k8, k_scale = ref.quantize_int8(ref.smooth_k(k, k_mean, k_factor))
    v8, v_scale = ref.quantize_int8(v)
    cache = ref.ReferenceCache(k8, k_scale, v8, v_scale, k_factor, k.shape[2] // QUANT_BLOCK * QUANT_BLOCK)
    return cosine(ref.turbo_decode(q, cache, num_splits=num_splits), ref.exact_attention(q, k, v))


# Bounds below: the targets where they hold per draw; figures are the reference's decode vs exact
# attention over 120 fresh seeds of the same configuration (mean / min; docs/algorithm.md §2.1).


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_4bit_random(turbo_cpu, rng, head_dim):
    q, k, v = random_qkv(rng, 2, 8, 4, 1, 4096 + 5, head_dim)
    # target 0.99: D=64 0.9939 / 0.9925, D=128 0.9938 / 0.9924
    cache = check_decode(turbo_cpu, q, k, v, [4] * 4, 4, 0.99)
    check_4bit_bytes(cache)


def test_decode_4bit_realistic_long_gqa(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 1, 8, 2, 1, 4096 + 5, 64)
    # target 0.99: .9963 / .9949 (30 seeds)
    cache = check_decode(turbo_cpu, q, k, v, [4] * 2, 4, 0.99)
    check_4bit_bytes(cache)


def test_decode_4bit_realistic(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 2, 8, 4, 1, 2048 + 40, 128)
    # target 0.99: .9960 / .9923 (150 seeds). K's balance factor keeps the four x20 channels from setting
    # every block's INT8 scale (without it the INT8 cache alone went down to .9908: docs §1); what is left
    # is stage 2's loss over the INT8 cache, .0037 mean and .0051 max over 60 seeds.
    cache = check_decode(turbo_cpu, q, k, v, [4] * 4, 3, 0.99)
    int8_floor = int8_cache_cosine(q, k, v, 3)
    exact = cosine(turbo_cpu.decode(q, cache, num_splits=3), ref.exact_attention(q, k, v))
    print(f"INT8 cache alone cos={int8_floor:.5f}; stage-2 loss {int8_floor - exact:.5f}")
    assert int8_floor >= 0.998
    assert int8_floor - exact <= 0.0075


def test_decode_mixed_precision_realistic(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 2, 8, 4, 1, 2048, 128)
    head_bits = select_head_bits(k, v, 0.25)
    assert sorted(head_bits.tolist()) == [2, 4, 4, 4]
    # target 0.97: .9957 / .9930 (30 seeds; before K's balance factor .9941 / .9811 over 120)
    cache = check_decode(turbo_cpu, q, k, v, head_bits, 4, 0.97)
    assert cache.nbytes() < turbo_cpu.compress_kv(k, v, [4] * 4).nbytes()


@pytest.mark.parametrize("batch,heads,tokens,splits", [
    (1, 32, 32768, 32),   # (32 + 1 INT8 CTA) x 32 heads = 1056 CTAs fill one wave of 8 per SM on 132 SMs
    (1, 32, 40 * 64, 20),  # 32 by the wave, 2 tiles each: 20 splits
    (16, 32, 32768, 2),   # a share of 2 per head: the INT8 CTA does not take a split's place; 3 splits
                          # would be 1.45 waves of long CTAs (measured 15 % slower on the H200)
    (64, 32, 4096, 1),    # more sequences x heads than a wave holds: one split
    (1, 8, 64 * 5, 5),    # a short cache: one 64-token tile per split at most
])
def test_gpu_split_count_fills_one_wave(batch, heads, tokens, splits):
    """The CUDA split rule: n = floor(8 * SMs / (B * H)) CTAs per head, s = min(tiles, max(1, n - 1 if
    n > 2 else n)) (one of the n is the INT8 CTA), then only as many splits as get tiles (ceil(tiles / s)
    each), on a stand-in H200 (132 SMs)."""
    from types import SimpleNamespace

    q = torch.empty(batch, heads, 1, 128)
    h200 = SimpleNamespace(device_type="cuda", _sm_count={q.device: 132})
    assert TurboAttention._auto_splits(h200, q, tokens) == splits


def test_decode_groups_with_their_own_split_counts(turbo_cpu, rng, monkeypatch):
    """Chosen splits depend on a launch's heads (a bit width of few heads takes more, to fill a GPU):
    slots a group leaves unwritten must read as empty, so each head gets its own group's result."""
    head_bits = [4, 2, 4, 4]  # GQA 2: the 4-bit launch covers 6 query heads, the 2-bit one 2
    q, k, v = realistic_qkv(rng, 2, 8, 4, 1, 64 * 9 + 21, 64)  # sink block, 8 packed blocks, buffer
    splits_for_heads = {6: 3, 2: 7}
    monkeypatch.setattr(turbo_cpu, "_auto_splits", lambda q, tokens, heads=None: splits_for_heads[heads])
    cache = turbo_cpu.compress_kv(k, v, head_bits)
    out = turbo_cpu.decode(q, cache, num_splits=0)  # 0: choose per launch
    expected = {s: ref.turbo_decode(q, ref.build_cache(k, v, head_bits), num_splits=s) for s in (3, 7)}
    two_bit = [2, 3]  # the query heads of KV head 1
    for heads, splits in ((two_bit, 7), ([0, 1, 4, 5, 6, 7], 3)):
        assert cosine(out[:, heads], expected[splits][:, heads]) >= SAME_ALGORITHM
        # another split count moves nearly every (batch, head) row by more than 1e-5; float32 vs
        # float64 may flip one P code's rounding (or the SAS cut) and move a few rows by ~1e-3
        row_error = np.abs(out[:, heads] - expected[splits][:, heads]).max(axis=(2, 3))
        assert np.mean(row_error > 1e-5) <= 0.25, row_error
    assert not np.allclose(expected[3][:, two_bit], expected[7][:, two_bit], rtol=0, atol=1e-7)  # splits show


def test_decode_mixed_precision_random(turbo_cpu, rng):
    """i.i.d. heads, no head cheaper than another: the issue's 0.97 holds for the mean over fresh draws, not for
    every draw: that is out of reach of 2-bit codes at a quarter of the heads (docs §2.2: even Shannon's bound for
    2 bits per value gives a minimum of .973). Float64 reference, 400 draws (seed 12345): mean .9763, std .007,
    1st percentile .958, min .883, a draw where one query attends strongly to a token of a 2-bit KV head (its
    output norm falls to half the exact one; the kernel matches the reference there). The mean of 32 draws
    stays above .971 (2000 resamples of those 400), so 0.97 holds it; each draw keeps a floor of 0.85 (it
    was 0.94, which that tail broke in roughly one run in ten)."""
    exact = []
    for _ in range(32):
        q, k, v = random_qkv(rng, 1, 8, 8, 1, 1024, 64)
        cache = check_decode(turbo_cpu, q, k, v, select_head_bits(k, v, 0.25), 2, 0.85)
        exact.append(cosine(turbo_cpu.decode(q, cache, num_splits=2), ref.exact_attention(q, k, v)))
    print(f"vs exact over {len(exact)} draws: mean {np.mean(exact):.4f}, min {np.min(exact):.4f}")
    assert np.mean(exact) >= 0.97


def test_decode_buffer_only_and_no_buffer(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 4, 2, 1, 40, 64)  # shorter than one block: INT8 buffer only
    cache = check_decode(turbo_cpu, q, k, v, [4, 2], 2, 0.999)
    assert cache.groups == [] and cache.buffer_k.shape[2] == 40
    q, k, v = random_qkv(rng, 1, 4, 2, 1, 128, 64)  # exact blocks: no buffer
    cache = check_decode(turbo_cpu, q, k, v, [4, 4], 5, 0.98)
    assert cache.buffer_k is None


@pytest.mark.parametrize("length", [64, 65, 128, 1000])
def test_sink_block_int8_and_decode(turbo_cpu, rng, length):
    """Block 0 stays at its FlashQ INT8 codes (the sink block); blocks 1.. are packed; decode matches the reference."""
    q, k, v = realistic_qkv(rng, 2, 8, 4, 1, length, 128)
    head_bits = [2, 4, 4, 2]
    # what this checks is the layout and kernel == reference; vs exact only a sanity bound: with half the heads
    # at 2 bits (not chosen by priority) L = 1000 draws gave 0.94-0.99
    cache = check_decode(turbo_cpu, q, k, v, head_bits, 3, 0.9)
    k_t, v_t = torch.from_numpy(k), torch.from_numpy(v)
    k8, k_scale = turbo_cpu.quantize(k_t, "float32", turbo_cpu.smoothing(k_t, "float32"))
    v8, v_scale = turbo_cpu.quantize(v_t, "float32")
    assert torch.equal(cache.sink_k, k8[:, :, :64]) and torch.equal(cache.sink_v, v8[:, :, :64])
    assert torch.equal(cache.sink_k_scale, k_scale[:, :, :1]) and torch.equal(cache.sink_v_scale, v_scale[:, :, :1])
    closed = length // 64 * 64
    assert (cache.compressed_len, cache.sink_len, cache.packed_len) == (closed, 64, closed - 64)
    assert all(t.shape[2] in (closed - 64, (closed - 64) // 64) for g in cache.groups for t in g.tensors())
    assert (cache.groups == []) == (closed == 64)
    assert (cache.buffer_k is None) == (closed == length)
    if cache.buffer_k is not None:
        assert torch.equal(cache.buffer_k, k8[:, :, closed:])
    # the reference's sink block is the float64 INT8 codes of block 0, never compressed
    ref_cache = ref.build_cache(k, v, head_bits)
    k8_ref, _ = ref.quantize_int8(ref.smooth_k(k, *ref.smoothing(k)))
    assert ref_cache.sink_len == 64 and np.array_equal(ref_cache.k8[:, :, :64], k8_ref[:, :, :64])


def test_sink_block_keeps_attention_sink_accurate(turbo_cpu, rng):
    """An attention sink (token 0: a large-norm K/V that the queries align with, as in real LLM layers) at
    INT8 beats the same cache with block 0 compressed to 2/4 bits (the reference with sink=False)."""
    d = 128
    q, k, v = (x.astype(np.float64) for x in realistic_qkv(rng, 1, 8, 4, 1, 1024 + 17, d))
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    a = 8 * np.abs(k).max()
    k[:, :, 0] += a * u
    v[:, :, 0] += 4 * np.abs(v).max() * rng.standard_normal((1, 4, d)) / np.sqrt(d)
    # queries along u (their own component along it replaced): token 0's logit set to the log-sum-exp of
    # the other tokens' logits, so token 0 takes about half of every head's attention
    q -= (q @ u)[..., None] * u
    k_rep = np.repeat(k, 2, axis=1)  # the KV head of each query head
    logits = np.einsum("bhd,bhjd->bhj", q[:, :, 0], k_rep) / np.sqrt(d)
    others = np.log(np.exp(logits[..., 1:] - logits[..., 1:].max(-1, keepdims=True)).sum(-1)) + logits[..., 1:].max(-1)
    q[:, :, 0] += ((others - logits[..., 0]) * np.sqrt(d) / a)[..., None] * u
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    exact = ref.exact_attention(q, k, v)
    logits = np.einsum("bhd,bhjd->bhj", q[:, :, 0].astype(np.float64), k_rep) / np.sqrt(d)
    share = np.exp(logits - logits.max(-1, keepdims=True))
    share = share[..., 0] / share.sum(-1)
    head_bits = [2, 2, 4, 4]
    cache = turbo_cpu.compress_kv(k, v, head_bits)
    out = turbo_cpu.decode(q, cache, num_splits=4)
    assert cosine(out, ref.turbo_decode(q, ref.build_cache(k, v, head_bits), num_splits=4)) >= SAME_ALGORITHM
    no_sink = ref.turbo_decode(q, ref.build_cache(k, v, head_bits, sink=False), num_splits=4)
    k_mean, k_factor = ref.smoothing(k)
    k8, k_scale = ref.quantize_int8(ref.smooth_k(k, k_mean, k_factor))
    v8, v_scale = ref.quantize_int8(v)
    int8_only = ref.turbo_decode(q, ref.ReferenceCache(k8, k_scale, v8, v_scale, k_factor, 1024), num_splits=4)
    err_sink, err_no_sink, err_int8 = (np.linalg.norm(x - exact) / np.linalg.norm(exact) for x in (out, no_sink, int8_only))
    print(f"token 0's attention share {share.min():.2f}..{share.max():.2f}; relative error vs exact: "
          f"INT8 sink block {err_sink:.5f}, block 0 compressed {err_no_sink:.5f}, INT8 cache alone {err_int8:.5f}")
    assert share.min() >= 0.3  # a real sink
    # what stage 2 adds over the INT8 cache: with block 0 at INT8, a small part of what it adds with block 0
    # at 2/4 bits (16 seeds: at most 0.08 of it)
    assert err_sink - err_int8 <= 0.25 * (err_no_sink - err_int8)
    assert err_sink < err_no_sink


def test_cpu_prefill_integer_products_are_vectorized():
    """The CPU build's Q·Kᵀ and P·V are SIMD: integer vector multiplies in the LLVM IR (the prefill's only
    int32 multiplies are those two products). Written as reductions innermost they were scalar and the
    prefill 8x slower (README, Status); this fails on that form."""
    import re

    import tvm
    from tvm.s_tir import Schedule

    from turbotvm.codegen.build import make_target
    from turbotvm.kernels.prefill import prefill
    from turbotvm.schedules.cpu import schedule_cpu

    sch = Schedule(tvm.IRModule({"prefill": prefill(64, False, "float32").with_attr("global_symbol", "prefill")}))
    schedule_cpu(sch, "prefill", None)
    ir = tvm.compile(sch.mod, target=make_target("llvm")).mod.inspect_source("ll")
    assert re.search(r"= mul (nsw |nuw )*<\d+ x i32>", ir), "no vector int32 multiply: the INT8 products are scalar"


@pytest.mark.parametrize("length", [40, 64, 1000, 1024])  # open block only, sink only, both, sink + packed
def test_step_kernel_args_follow_the_kernel_parameters(turbo_cpu, rng, length):
    """The CUDA step kernel's arguments (built on the CPU, matched by parameter name): a wrong order would
    only show on a GPU, and an absent INT8 region is the other region's tensors with 0 tokens."""
    from turbotvm.attention import step_kernel_args
    from turbotvm.kernels.decode_cuda import decode_step_cuda

    q, k, v = random_qkv(rng, 1, 4, 2, 1, length, 64)
    cache = turbo_cpu.compress_kv(k, v, [4, 4])
    q = torch.from_numpy(q)
    group = cache.groups[0] if cache.groups else turbo_cpu._no_packed_group(q.device, 1, 2, 64)
    workspace = turbo_cpu._decode_workspace(q, 3)
    out = torch.empty_like(q)
    args = step_kernel_args(q, cache, group, cache.int8_regions(), workspace, out, 0.125, 2, 2)
    sink_len, open_len = min(length // 64, 1) * 64, length % 64
    sink = [cache.sink_k, cache.sink_k_scale, cache.sink_v, cache.sink_v_scale]
    open_block = [cache.buffer_k, cache.buffer_k_scale, cache.buffer_v, cache.buffer_v_scale]
    present_sink, present_open = (sink if sink_len else open_block), (open_block if open_len else sink)
    expected = {"q": q, "k_factor": cache.k_factor, "heads": group.heads, "o_part": workspace[1],
                "m_part": workspace[2], "l_part": workspace[3], "counters": workspace[4], "out": out,
                "sm_scale": 0.125, "group_size": 2, "num_splits": 2, "length": cache.packed_len,
                "sink_len": sink_len, "open_len": open_len}
    for i, name in enumerate(("k", "k_scale", "v", "v_scale")):
        expected[f"sink_{name}"], expected[f"open_{name}"] = present_sink[i], present_open[i]
    for name in ("k_codes", "k_step", "k_zero", "k_scale", "v_codes", "v_step", "v_zero", "v_scale"):
        expected[name] = getattr(group, name)
    params = [p.name for p in decode_step_cuda(64, 4, "float16").params]
    assert len(args) == len(params) == len(expected)
    for name, arg in zip(params, args):
        assert arg is expected[name] or (not torch.is_tensor(arg) and arg == expected[name]), name
    assert (cache.packed_len, sink_len + open_len) == (max(length // 64 - 1, 0) * 64, length - cache.packed_len)


def test_batches_past_the_index_limit_are_split(turbo_cpu, rng, monkeypatch):
    """The CUDA kernels index in int32: a call whose tensors would pass 2**31 elements runs batch slice by
    batch slice, with the same result (here the CPU runtime with a small limit)."""
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 5, 4, 2, 70, 130, 64))
    whole = {"prefill": turbo_cpu.prefill(q, k, v, causal=True), "smoothing": turbo_cpu.smoothing(k, "float32")}
    whole["quantize"] = turbo_cpu.quantize(k, "float32", whole["smoothing"])
    whole["balanced"] = turbo_cpu.quantize(q, "float32", balance=whole["smoothing"][1])
    cache = turbo_cpu.compress_kv(k, v, [4, 2])
    monkeypatch.setattr(turbo_cpu, "index_limit", 2 * 4 * 130 * 64)  # 2-4 batch entries per call
    slices, batch_chunks = [], turbo_cpu._batch_chunks
    monkeypatch.setattr(turbo_cpu, "_batch_chunks", lambda *args: slices.append(batch_chunks(*args)) or slices[-1])
    split = {"prefill": turbo_cpu.prefill(q, k, v, causal=True), "smoothing": turbo_cpu.smoothing(k, "float32")}
    split["quantize"] = turbo_cpu.quantize(k, "float32", split["smoothing"])
    split["balanced"] = turbo_cpu.quantize(q, "float32", balance=split["smoothing"][1])
    for name, value in whole.items():
        assert all(torch.equal(a, b) for a, b in zip(*((x,) if torch.is_tensor(x) else x
                                                        for x in (value, split[name])))), name
    split_cache = turbo_cpu.compress_kv(k, v, [4, 2])
    # prefill (q, k, v: 3 slices), K's smoothing and quantization (2), Q's (2), each time
    assert sorted({len(s) for s in slices if len(s) > 1}) == [2, 3]
    assert all(torch.equal(a, b) for g, h in zip(cache.groups, split_cache.groups)
               for a, b in zip(g.tensors(), h.tensors()))
    widest = max(cache.groups, key=lambda g: g.k_codes.numel())  # a group tensor past the limit: refused
    codes = widest.k_codes.numel()
    monkeypatch.setattr(turbo_cpu, "index_limit", codes - 1)
    message = (rf"cache: expected the {widest.bits}-bit group's k_codes to hold at most {codes - 1} elements "
               rf"\(this build's kernels index in int32\), got {codes}")
    with pytest.raises(ValueError, match=message):
        turbo_cpu.decode(q[:, :, :1].contiguous(), cache)
    monkeypatch.setattr(turbo_cpu, "index_limit", 64 * 64)
    with pytest.raises(ValueError, match=r"q: expected at most 4096 elements per batch entry"):
        turbo_cpu.prefill(q, k, v)
