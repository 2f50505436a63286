"""The float64 oracle itself: SAS, FlashQ and the compression step behave as docs/algorithm.md says."""

import numpy as np

from turbotvm import reference as ref
from turbotvm.algorithm import CACHE_GROUP, INT8_MAX, QUANT_BLOCK, SAS_LUT, SAS_MAX_INT, SAS_POLY
from turbotvm.testing import cosine, random_qkv


def test_sas_close_to_exp_and_sparse_below_cutoff():
    x = np.linspace(-(SAS_MAX_INT + 1) + 1e-9, 0, 100001)
    rel = np.abs(ref.sas_exp(x) / np.exp(x) - 1)
    assert rel.max() < 1e-3
    assert np.all(ref.sas_exp(np.array([-(SAS_MAX_INT + 1) - 1e-6, -50.0, -1e30])) == 0)


def test_quantize_int8_blocks_error_within_half_step(rng):
    x = rng.standard_normal((2, 3, 150, 64)) * rng.uniform(0.1, 10, size=(2, 3, 1, 1))
    codes, scale = ref.quantize_int8(x)
    assert codes.dtype == np.int8 and scale.shape == (2, 3, 3)
    assert np.abs(codes).max() == INT8_MAX
    back = codes * np.repeat(scale, QUANT_BLOCK, axis=2)[:, :, :150, None]
    step = np.repeat(scale, QUANT_BLOCK, axis=2)[:, :, :150, None]
    assert np.all(np.abs(back - x) <= step / 2 + 1e-12)


def _per_token(param):
    """[B,H,L/64,G,D] step/zero -> [B,H,L,D]: the value that applies to each token."""
    return np.repeat(param.reshape(*param.shape[:2], -1, param.shape[-1]), CACHE_GROUP, axis=2).astype(np.int64)


def test_compress_roundtrip_error_bounded_by_step(rng):
    # uniform and Gaussian-like blocks, a few wide channels to be kept
    x8 = np.clip(rng.normal(0, 30, size=(1, 2, 128, 64)), -127, 127)
    x8[..., [3, 40]] = rng.integers(-127, 128, size=(1, 2, 128, 2))
    x8 = x8.round().astype(np.int8)
    for bits in (4, 2):
        levels = 2**bits - 1
        code, step, zero, kept = ref.compress_int8(x8, bits, outliers=4)
        assert code.max() <= levels and step.shape == zero.shape == (1, 2, 2, QUANT_BLOCK // CACHE_GROUP, 64)
        back = ref.decompress_int8(code, step, zero, kept).astype(np.int64)
        step_t, zero_t = _per_token(step), _per_token(zero)
        coded = step_t > 0
        # 4 kept channels per 64-token block, exact, and they include the two widest
        assert np.all((~coded).reshape(1, 2, 2, 64, 64).sum(-1) == 4)
        assert np.all(~coded[..., [3, 40]])
        np.testing.assert_array_equal(back[~coded], x8.astype(np.int64)[~coded])
        # inside the grid the error is at most half a step (clipped tails may err more)
        inside = coded & (x8 >= zero_t) & (x8 <= zero_t + levels * step_t)
        assert np.all(np.abs(back - x8)[inside] <= step_t[inside] // 2)
        # expansion is linear: no code lands above 127, so the CUDA decode may skip the clamp
        linear = code * step_t + zero_t
        np.testing.assert_array_equal(linear[coded], back[coded])
        assert linear.max() <= 127 and linear.min() >= -128


def test_fitted_step_never_worse_than_min_max(rng):
    """The chosen (step, zero) has at most the squared error of the grid over [min, max]."""
    groups = np.clip(rng.standard_t(3, size=(4, 8, CACHE_GROUP, 16)) * 20, -127, 127).round().astype(np.int64)
    for levels in (3, 15):
        lo, hi = groups.min(-2), groups.max(-2)
        widest = np.maximum(1, -(-(hi - lo) // levels))
        step, zero = ref.fit_step_zero(groups, levels)
        assert np.all((step >= 1) & (2 * step >= widest) & (step <= widest))

        def err(s, z):
            back = ref._encode(groups, s[..., None, :], z[..., None, :], levels) * s[..., None, :] + z[..., None, :]
            return ((back - groups) ** 2).sum(-2)

        fitted, min_max = err(step, zero), err(widest, ref._zero_point(lo, hi, widest, levels))
        assert np.all(fitted <= min_max)
        if levels == 3:  # 4 levels: clipping the tails pays off on heavy-tailed data
            assert fitted.sum() < 0.8 * min_max.sum()


def test_compress_rounding_is_unbiased(rng):
    """Ties go to even codes: the mean error over many blocks stays near zero."""
    x8 = rng.integers(-100, 100, size=(1, 4, 64 * 64, 64)).astype(np.int8)
    back = ref.decompress_int8(*ref.compress_int8(x8, 4)).astype(np.float64)
    assert abs(np.mean(back - x8)) < 0.05


def test_turbo_prefill_close_to_exact(rng):
    q, k, v = random_qkv(rng, 1, 4, 2, 256, 256, 64)
    assert cosine(ref.turbo_prefill(q, k, v, causal=True), ref.exact_attention(q, k, v, causal=True)) > 0.999


def _trending_qkv(rng, kv_len):
    """Random Q, K and a V that drifts along the sequence, as positional content does in real V."""
    q, k, v = random_qkv(rng, 1, 2, 2, 1, kv_len, 64)
    return q, k, 0.5 * v + np.linspace(-1, 1, kv_len)[:, None]


def test_sas_is_one_at_zero_so_a_state_whose_max_stays_is_not_rescaled():
    """corr = SAS(0) for every tile that does not raise the running max; it must be exactly 1, in the
    float64 reference and in the kernels' float32 Horner evaluation (a table step at y = 0)."""
    assert ref.sas_exp(0.0) == 1.0
    c3, c2, c1, c0 = np.float32(SAS_POLY)
    y = np.float32(0)
    assert np.float32(SAS_LUT[0]) * (((c3 * y + c2) * y + c1) * y + c0) == np.float32(1)


def test_turbo_prefill_and_decode_keep_every_token_weight_over_long_sequences(rng):
    """8K keys (128 tiles) with a drift in V: a state shrunk by a constant factor per tile would weigh
    early tokens less and move the output (cos 0.4-0.75 with SAS(0) = 0.99941)."""
    q, k, v = _trending_qkv(rng, 8192)
    assert cosine(ref.turbo_prefill(q, k, v), ref.exact_attention(q, k, v)) > 0.998
    # decode in one split (127 INT4 tiles in one state) vs exact attention on the cache's own values,
    # so that only the softmax differs
    cache = ref.build_cache(k, v, [4, 4])
    k_cached, v_cached = (x8 * np.repeat(scale, QUANT_BLOCK, axis=2)[..., None]
                          for x8, scale in ((cache.k8, cache.ks), (cache.v8, cache.vs)))
    exact = ref.exact_attention(ref.balance_q(q, cache.k_factor), k_cached, v_cached)
    assert cosine(ref.turbo_decode(q, cache, num_splits=1), exact) > 0.998


def test_exact_attention_matches_softmax_formula(rng):
    q, k, v = random_qkv(rng, 1, 2, 1, 5, 7, 64)
    s = np.einsum("bhid,bhjd->bhij", q.astype(float), np.repeat(k, 2, 1).astype(float)) / 8
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ np.repeat(v, 2, 1)
    np.testing.assert_allclose(ref.exact_attention(q, k, v), expected, rtol=1e-10)


def test_sas_never_increases_so_p_codes_stay_within_int8():
    """The CUDA prefill packs rint(SAS(-t) / SAS(-t_max) * 127) without a clamp: that needs SAS to be
    non-increasing in t (no key of a tile above the tile's largest), across the table's steps too."""
    t = np.linspace(0, SAS_MAX_INT + 1, 2_000_001)
    p = ref.sas_exp(-t)
    assert np.all(np.diff(p) <= 0)
    # at each step, in float32 as the kernels evaluate it: LUT[n - 1] * poly(-1) >= LUT[n] * poly(0)
    c3, c2, c1, c0 = np.float32(SAS_POLY)
    lut = np.float32(SAS_LUT)
    y = np.float32(-1)
    assert np.all(lut[:-1] * (((c3 * y + c2) * y + c1) * y + c0) >= lut[1:] * c0)
