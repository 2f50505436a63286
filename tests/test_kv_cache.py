"""TurboKVCache on the CPU: appends of any size, block boundaries, growth, bytes, decode vs the float64 reference."""

import numpy as np
import pytest
import torch

from turbotvm.algorithm import CACHE_GROUP, CACHE_K_OUTLIERS

from turbotvm import TurboKVCache, select_head_bits, turbo_decode
from turbotvm import reference as ref
from turbotvm.testing import cosine, random_qkv, realistic_qkv

SAME_ALGORITHM = 0.9999


class Appender:
    """Appends chunks to a TurboKVCache and keeps the concatenated K/V, for the reference."""

    def __init__(self, cache, rng, batch, kv_heads, head_dim, dtype=torch.float32, realistic=False):
        self.cache, self.rng, self.dtype, self.realistic = cache, rng, dtype, realistic
        self.shape = (batch, kv_heads, head_dim)
        self.k, self.v = [], []

    def append(self, tokens):
        b, h, d = self.shape
        make = realistic_qkv if self.realistic else random_qkv
        _, k, v = make(self.rng, b, h, h, 1, tokens, d)
        k, v = torch.from_numpy(k).to(self.dtype), torch.from_numpy(v).to(self.dtype)
        self.cache.append(k, v)
        self.k.append(k)
        self.v.append(v)

    def expected(self, q: torch.Tensor):
        k_all, v_all = (torch.cat(x, 2).double().numpy() for x in (self.k, self.v))
        smoothing = ref.smoothing(self.k[0].double().numpy())  # fixed by the first append
        return ref.turbo_decode(q.double().numpy(), ref.build_cache(k_all, v_all, self.cache.head_bits, smoothing))


def check_decode(appender, rng, heads, runtime=None):
    b, _, d = appender.shape
    q = torch.from_numpy(rng.standard_normal((b, heads, 1, d))).to(appender.dtype)
    out = turbo_decode(q, appender.cache)
    expected = appender.expected(q)
    print(f"length={appender.cache.length} vs reference cos={cosine(out.double(), expected):.8f}")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert cosine(out.double(), expected) >= SAME_ALGORITHM
    if runtime is not None:  # the op and TurboAttention.decode read the cache alike
        assert torch.equal(out, runtime.decode(q, appender.cache))
    return out


@pytest.mark.parametrize("head_dim, head_bits", [(128, [4, 2]), (64, [2, 4])])
def test_prompt_steps_and_chunk_match_reference(cpu_ops_runtime, rng, head_dim, head_bits):
    cache = TurboKVCache(head_bits=head_bits)
    kv = Appender(cache, rng, 2, 2, head_dim)
    kv.append(100)  # prompt: one block compressed, 36 tokens in the INT8 buffer
    assert (cache.length, cache.compressed_len, cache.buffer_k.shape[2]) == (100, 64, 36)
    check_decode(kv, rng, 8, cpu_ops_runtime)
    for _ in range(30):  # one token at a time, across the 128 boundary
        kv.append(1)
        if cache.length in (127, 128, 129):
            check_decode(kv, rng, 8, cpu_ops_runtime)
    assert (cache.length, cache.compressed_len, cache.buffer_k.shape[2]) == (130, 128, 2)
    kv.append(70)  # a chunk that closes one block and opens the next
    assert (cache.length, cache.compressed_len, cache.buffer_k.shape[2]) == (200, 192, 8)
    check_decode(kv, rng, 8, cpu_ops_runtime)


def test_block_boundaries(cpu_ops_runtime, rng):
    cache = TurboKVCache(head_bits=[4, 4, 2, 4])
    kv = Appender(cache, rng, 1, 4, 64)
    kv.append(63)  # buffer only
    assert cache.compressed_len == 0 and cache.groups == [] and cache.buffer_k.shape[2] == 63
    check_decode(kv, rng, 4)
    assert cache.sink_k is None and cache.sink_len == 0
    kv.append(1)  # fills block 0: the INT8 sink block, nothing packed, nothing left in the buffer
    assert (cache.length, cache.compressed_len, cache.buffer_k) == (64, 64, None)
    assert (cache.sink_len, cache.packed_len, cache.groups) == (64, 0, [])
    check_decode(kv, rng, 4)
    kv.append(64)  # a whole block on a boundary: the first packed block
    assert (cache.length, cache.compressed_len, cache.buffer_k) == (128, 128, None)
    assert (cache.sink_len, cache.packed_len) == (64, 64)
    kv.append(10)
    kv.append(200)  # three blocks closed by one append
    assert (cache.length, cache.compressed_len, cache.buffer_k.shape[2]) == (338, 320, 18)
    check_decode(kv, rng, 8, cpu_ops_runtime)


def test_storage_grows_by_doubling(cpu_ops_runtime, rng):
    cache = TurboKVCache(head_bits=[4, 2])
    kv = Appender(cache, rng, 1, 2, 64)
    capacities = []
    for tokens in (256, 64, 128, 64, 1, 700):  # the groups hold the tokens after the 64-token sink block
        kv.append(tokens)
        capacities.append(cache.capacity)
    assert capacities == [192, 384, 384, 768, 768, 1536]
    for group in cache.groups:  # dim 2: the token axis (codes) or the 64-token block axis
        assert [t.shape[2] for t in group.tensors()] == [1536, 24, 24, 24] * 2
    assert cache.nbytes() < cache.nbytes(capacity=True)
    check_decode(kv, rng, 4, cpu_ops_runtime)  # blocks stored before each growth survive it


def test_reserved_capacity(cpu_ops_runtime, rng):
    # rounded up to whole blocks (1024 tokens), less the sink block: the groups hold 960
    cache = TurboKVCache(head_bits=[4, 4], reserve_tokens=1000)
    kv = Appender(cache, rng, 1, 2, 64)
    for tokens in (300, 64, 600):
        kv.append(tokens)
        assert cache.capacity == 960
    kv.append(200)  # past the reservation: doubling
    assert cache.capacity == 1920
    check_decode(kv, rng, 2)


def test_bytes_4bit_d128(cpu_ops_runtime, rng):
    b, hkv, d = 1, 4, 128
    cache = TurboKVCache(head_bits=[4] * hkv)
    kv = Appender(cache, rng, b, hkv, d, dtype=torch.bfloat16)
    kv.append(4000)
    kv.append(96)
    for _ in range(63):  # the largest open block: 63 tokens kept in bf16 and in INT8
        kv.append(1)
    length, closed, open_ = 4159, 4096, 63
    packed = closed - 64  # block 0 is the INT8 sink block
    assert (cache.length, cache.compressed_len, cache.packed_len) == (length, closed, packed)
    per_head = (2 * packed * d // 2  # K and V codes, 4 bits
                + packed * CACHE_K_OUTLIERS  # K's kept INT8 channels, one byte each per token
                + 2 * (packed // CACHE_GROUP) * d * 2  # step (uint8) and zero (int8) per 32-token group and channel
                + 2 * (packed // 64) * 4  # INT8 block scales
                + 2 * 64 * d + 2 * 4  # the sink block: K and V INT8 codes and their scales
                + 2 * open_ * d * (2 + 1)  # the open block in bf16 and INT8
                + 2 * 4  # its INT8 scales
                + 2 * d * 4)  # K smoothing mean and balance factor (float32)
    assert cache.nbytes() == b * hkv * per_head + 4 * hkv  # + the group's head ids (int32)
    assert cache.fp16_nbytes() == 2 * 2 * b * hkv * length * d
    ratio = cache.nbytes() / cache.fp16_nbytes()
    open_bytes = b * hkv * (2 * open_ * d * 3 + 2 * 4)
    compressed_ratio = (cache.nbytes() - open_bytes) / (2 * 2 * b * hkv * closed * d)
    print(f"bytes / fp16 bytes = {ratio:.4f}, compressed blocks alone {compressed_ratio:.4f} "
          f"(with capacity {cache.nbytes(capacity=True) / cache.fp16_nbytes():.4f})")
    # the 0.3x holds for the closed blocks (the INT8 sink block included: 0.2928); the worst-case open
    # block (63 tokens in bf16 and INT8) adds about 0.02 at 4K tokens, less as the cache grows
    assert compressed_ratio <= 0.3
    assert ratio <= 0.312


def test_sink_block_from_appends(cpu_ops_runtime, rng):
    """The first block to close becomes the INT8 sink block (the kernel's own codes of tokens 0..63, never
    compressed), whatever the appends; later blocks go to the packed groups."""
    cache = TurboKVCache(head_bits=[2, 4])
    kv = Appender(cache, rng, 1, 2, 128, realistic=True)
    kv.append(40)
    for _ in range(30):  # one token at a time, across the 64 boundary
        kv.append(1)
    assert (cache.length, cache.compressed_len, cache.sink_len, cache.packed_len, cache.groups) == (70, 64, 64, 0, [])
    k_all, v_all = torch.cat(kv.k, 2), torch.cat(kv.v, 2)
    k8, k_scale = cpu_ops_runtime.quantize(k_all[:, :, :64].contiguous(), "float32", (cache.k_mean, cache.k_factor))
    v8, v_scale = cpu_ops_runtime.quantize(v_all[:, :, :64].contiguous(), "float32")
    sink = (k8, k_scale, v8, v_scale)
    assert all(torch.equal(x, y) for x, y in zip((cache.sink_k, cache.sink_k_scale, cache.sink_v, cache.sink_v_scale), sink))
    check_decode(kv, rng, 4, cpu_ops_runtime)
    kv.append(200)  # closes 3 blocks: packed, the sink block unchanged
    assert (cache.compressed_len, cache.packed_len, cache.capacity) == (256, 192, 192)
    assert all(torch.equal(x, y) for x, y in zip((cache.sink_k, cache.sink_k_scale, cache.sink_v, cache.sink_v_scale), sink))
    check_decode(kv, rng, 4, cpu_ops_runtime)
    nbytes = cache.nbytes()
    assert nbytes == (sum(t.numel() * t.element_size() for t in sink) + 2 * cache.k_mean.numel() * 4  # mean, factor
                      + sum(t.numel() * t.element_size() for g in cache.groups for t in (g.heads, *g.tensors()))
                      + sum(t.numel() * t.element_size() for t in (cache.buffer_k, cache.buffer_k_scale, cache.buffer_v,
                                                                    cache.buffer_v_scale))
                      + 2 * cache.buffer_k.numel() * kv.k[0].element_size())  # the open block's tokens, K and V
    assert cache.buffer_k.shape[2] == 14 and cache.nbytes(capacity=True) > nbytes


def test_single_append_equals_compress_kv(cpu_ops_runtime, rng):
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 2, 8, 4, 1, 333, 128))
    cache = TurboKVCache(head_bits=[4, 2, 2, 4])
    cache.append(k, v)
    assert torch.equal(turbo_decode(q, cache), cpu_ops_runtime.decode(q, cpu_ops_runtime.compress_kv(k, v, [4, 2, 2, 4])))


def test_appends_equal_one_quantization(cpu_ops_runtime, rng):
    """A cache grown token by token holds, bit for bit, what one quantization of all its tokens (with the
    prompt's K smoothing) gives: the sink block, the packed groups and the open block's codes and scales."""
    _, k, v = (torch.from_numpy(x).to(torch.bfloat16) for x in realistic_qkv(rng, 2, 4, 4, 1, 200, 64))
    cache = TurboKVCache(head_bits=[4, 2, 4, 4])
    cache.append(k[:, :, :100], v[:, :, :100])
    for t in range(100, 200):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    smoothing = cpu_ops_runtime.smoothing(k[:, :, :100].contiguous(), "bfloat16")
    k8, k_scale = cpu_ops_runtime.quantize(k, "bfloat16", smoothing)
    v8, v_scale = cpu_ops_runtime.quantize(v, "bfloat16")
    held = (cache.sink_k, cache.sink_k_scale, cache.sink_v, cache.sink_v_scale,
            cache.buffer_k, cache.buffer_k_scale, cache.buffer_v, cache.buffer_v_scale)
    once = (k8[:, :, :64], k_scale[:, :, :1], v8[:, :, :64], v_scale[:, :, :1],
            k8[:, :, 192:], k_scale[:, :, 3:], v8[:, :, 192:], v_scale[:, :, 3:])
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(held, once))
    groups = cpu_ops_runtime.compress_blocks(k8[:, :, 64:192].contiguous(), k_scale[:, :, 1:3].contiguous(),
                                             v8[:, :, 64:192].contiguous(), v_scale[:, :, 1:3].contiguous(), cache.head_bits)
    for stored, expected in zip(cache.groups, groups):
        for a, b in zip(stored.tensors(), expected.tensors()):
            assert torch.equal(a[:, :, :b.shape[2]], b)


def test_head_bits_and_mean_fixed_by_first_append(cpu_ops_runtime, rng):
    cache = TurboKVCache(share_2bit=0.25)
    kv = Appender(cache, rng, 1, 4, 128, realistic=True)
    kv.append(300)
    assert cache.head_bits == tuple(int(b) for b in select_head_bits(kv.k[0], kv.v[0], 0.25))
    assert sorted(cache.head_bits) == [2, 4, 4, 4]
    k_mean, k_factor = cache.k_mean.clone(), cache.k_factor.clone()
    for held, expected in zip((k_mean, k_factor), ref.smoothing(kv.k[0].numpy())):
        np.testing.assert_allclose(held.numpy(), expected, rtol=1e-5, atol=1e-5)
    kv.append(50)
    kv.append(1)
    assert torch.equal(cache.k_mean, k_mean) and torch.equal(cache.k_factor, k_factor)
    check_decode(kv, rng, 8)


def test_strided_and_bfloat16_appends(cpu_ops_runtime, rng):
    cache = TurboKVCache(head_bits=[4, 4])
    kv = Appender(cache, rng, 1, 2, 64, dtype=torch.bfloat16)
    kv.append(90)
    k_bthd = torch.randn(1, 5, 2, 64, dtype=torch.bfloat16)  # a [B, T, H, D] projection, viewed as [B, H, T, D]
    v_bthd = torch.randn(1, 5, 2, 64, dtype=torch.bfloat16)
    cache.append(k_bthd.transpose(1, 2), v_bthd.transpose(1, 2))
    kv.k.append(k_bthd.transpose(1, 2))
    kv.v.append(v_bthd.transpose(1, 2))
    assert cache.length == 95
    check_decode(kv, rng, 4)


def test_open_block_in_place_and_no_alias_of_the_callers_tensors(cpu_ops_runtime, rng):
    """Appends write the open block into the cache's own whole-block tensors, the same ones from block to
    block (no allocation per token), and never keep the caller's k / v: overwriting them after append (as
    a model reuses its projection buffers) changes nothing."""
    cache = TurboKVCache(head_bits=[4, 2])
    kv = Appender(cache, rng, 2, 2, 64)
    kv.append(30)
    held = [t.data_ptr() for t in (*cache._open_tokens, *cache._open_codes)]
    for tokens in (1, 1, 32):  # grows the block, closes it at exactly 64: no open block left
        kv.append(tokens)
        assert [t.data_ptr() for t in (*cache._open_tokens, *cache._open_codes)] == held
    assert cache.buffer_k is None and cache.length == cache.compressed_len == 64
    k_new = torch.randn(2, 2, 1, 64)  # opens the next block: k_open would be k_new itself
    v_new = torch.randn(2, 2, 1, 64)
    cache.append(k_new, v_new)
    kv.k.append(k_new.clone())
    kv.v.append(v_new.clone())
    k_new.fill_(1e4)  # after the append: the cache must not see it
    v_new.fill_(-1e4)
    check_decode(kv, rng, 4)


def test_append_bad_inputs(cpu_ops_runtime):
    k = torch.randn(1, 2, 10, 64)
    with pytest.raises(ValueError, match=r"head_bits, share_2bit: expected at most one"):
        TurboKVCache(head_bits=[4, 4], share_2bit=0.5)
    with pytest.raises(ValueError, match=r"head_bits: expected 2 values \(one per KV head\) from \(2, 4\), got \(4, 4, 4\)"):
        TurboKVCache(head_bits=[4, 4, 4]).append(k, k)
    with pytest.raises(ValueError, match=r"head_bits: expected 2 values .* got \(8, 4\)"):
        TurboKVCache(head_bits=[8, 4]).append(k, k)
    cache = TurboKVCache(head_bits=[4, 4])
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 2, 10, 64\)"):
        cache.append(k, k[:, :, :5])
    with pytest.raises(ValueError, match=r"k: expected shape \[batch, kv_heads, tokens >= 1, head_dim\]"):
        cache.append(k[:, :, :0], k[:, :, :0])
    with pytest.raises(ValueError, match=r"k: head_dim 32 is not supported"):
        cache.append(k[..., :32], k[..., :32])
    with pytest.raises(TypeError, match=r"k: expected dtype in \('float32', 'bfloat16'\) \(this build\), got torch.float16"):
        cache.append(k.half(), k.half())
    assert cache.length == 0  # nothing was stored by the refused appends
    cache.append(k, k)
    with pytest.raises(ValueError, match=r"k: expected \[1, 2, T, 64\] torch.float32 on cpu \(the cache's\)"):
        cache.append(torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64))
    with pytest.raises(ValueError, match=r"k: expected \[1, 2, T, 64\] torch.float32"):
        cache.append(k.bfloat16(), k.bfloat16())
    assert cache.length == 10
