"""CUDA build (baseline SIMT schedule) on a real GPU: same numbers as the reference. Runs on the device."""

import numpy as np
import pytest
import torch

from turbotvm import TurboAttention
from turbotvm import reference as ref
from turbotvm.testing import cosine, random_qkv, realistic_qkv

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def turbo_cuda():
    return TurboAttention.build({"kind": "cuda", "arch": "sm_90"}, head_dims=(64, 128), dtypes=("float32", "float16"))


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


def test_decode_cuda_matches_reference(turbo_cuda, rng):
    q, k, v = random_qkv(rng, 2, 8, 4, 1, 1000, 128)
    bits = [4, 2, 4, 4]
    cache = turbo_cuda.compress_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), bits)
    out = turbo_cuda.decode(torch.from_numpy(q).cuda(), cache).cpu().numpy()
    assert cosine(out, ref.turbo_decode(q, ref.build_cache(k, v, bits))) >= 0.9999


def test_cpu_tensor_refused_by_cuda_build(turbo_cuda, rng):
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 1, 2, 2, 8, 8, 64))
    with pytest.raises(ValueError, match="q: expected a tensor on 'cuda'"):
        turbo_cuda.prefill(q, k, v)
    np.testing.assert_equal(q.device.type, "cpu")
