"""Bad input: a clear Python error naming the argument, raised before any kernel runs."""

import numpy as np
import pytest
import torch

from turbotvm.testing import random_qkv


@pytest.fixture
def qkv(rng):
    return [torch.from_numpy(x) for x in random_qkv(rng, 1, 4, 2, 64, 64, 64)]


def test_wrong_dtype(turbo_cpu, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"q: expected dtype in \('float32',\)"):
        turbo_cpu.prefill(q.double(), k, v)
    with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
        turbo_cpu.prefill(q, k.half(), v)


def test_wrong_rank(turbo_cpu, qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q: expected rank 4"):
        turbo_cpu.prefill(q[0], k, v)


def test_heads_not_a_multiple_of_kv_heads(turbo_cpu, rng):
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 1, 5, 2, 16, 16, 64))
    with pytest.raises(ValueError, match="k: expected a number of heads dividing q's 5"):
        turbo_cpu.prefill(q, k, v)


def test_unsupported_head_dim(turbo_cpu, rng):
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 1, 2, 2, 16, 16, 96))
    with pytest.raises(ValueError, match=r"q: head_dim 96 is not supported; expected one of \(64, 128\)"):
        turbo_cpu.prefill(q, k, v)


def test_non_contiguous(turbo_cpu, qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="k: expected a contiguous tensor"):
        turbo_cpu.prefill(q, k.transpose(1, 2).contiguous().transpose(1, 2), v)


def test_zero_length(turbo_cpu, qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q: expected no zero-length dimension"):
        turbo_cpu.prefill(q[:, :, :0], k, v)


def test_device_mismatch(turbo_cpu, qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q: expected a tensor on 'cpu'"):
        turbo_cpu.prefill(q.to("meta"), k, v)


def test_mismatched_kv_shapes_and_batch(turbo_cpu, qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="v: expected the shape of k"):
        turbo_cpu.prefill(q, k, v[:, :, :10].contiguous())
    with pytest.raises(ValueError, match="k: expected batch 1"):
        turbo_cpu.prefill(q, torch.cat([k, k]), torch.cat([v, v]))


def test_not_an_array(turbo_cpu, qkv):
    _, k, v = qkv
    with pytest.raises(TypeError, match="q: expected a torch.Tensor or numpy.ndarray, got list"):
        turbo_cpu.prefill([[1.0]], k, v)


def test_bad_scale(turbo_cpu, qkv):
    with pytest.raises(ValueError, match="scale: expected a finite positive float"):
        turbo_cpu.prefill(*qkv, scale=-1.0)


def test_decode_bad_inputs(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 4, 2, 3, 100, 64)
    cache = turbo_cpu.compress_kv(k, v, [4, 2])
    with pytest.raises(ValueError, match="q: expected one token per sequence"):
        turbo_cpu.decode(q, cache)
    with pytest.raises(ValueError, match="q: expected batch 1 and heads a multiple of 2"):
        turbo_cpu.decode(np.zeros((2, 4, 1, 64), np.float32), cache)
    with pytest.raises(ValueError, match="head_bits: expected 2 values"):
        turbo_cpu.compress_kv(k, v, [4, 3])
    with pytest.raises(ValueError, match="num_splits: expected a positive integer"):
        turbo_cpu.decode(q[:, :, :1].copy(), cache, num_splits=-1)


def test_decode_refuses_code_tensors_without_whole_blocks(turbo_cpu, rng):
    """V's codes are laid out per 64-token block: a cut block would be read past its end."""
    q, k, v = random_qkv(rng, 1, 4, 2, 1, 64 * 4, 64)
    cache = turbo_cpu.compress_kv(k, v, [4, 2])
    turbo_cpu.decode(q, cache)
    group = next(g for g in cache.groups if g.bits == 2)
    group.v_codes = group.v_codes[:, :, :100]
    with pytest.raises(ValueError, match=r"cache: expected the 2-bit group's v_codes on cpu with whole 64-token blocks "
                                         r"for its 192 tokens, got 100 rows"):
        turbo_cpu.decode(q, cache)


def test_decode_refuses_misaligned_or_short_group_tensors(turbo_cpu, rng):
    """The CUDA split kernel's copy engine reads K/V codes, steps and zeros from 16-byte aligned addresses,
    whole blocks of each."""
    q, k, v = random_qkv(rng, 1, 4, 2, 1, 64 * 4, 64)
    cache = turbo_cpu.compress_kv(k, v, [4, 2])
    group = next(g for g in cache.groups if g.bits == 4)
    shifted = torch.empty(group.k_step.numel() + 4, dtype=group.k_step.dtype)[4:].view(group.k_step.shape)
    shifted.copy_(group.k_step)
    group.k_step = shifted
    with pytest.raises(ValueError, match=r"cache: expected the 4-bit group's k_step at a 16-byte aligned address"):
        turbo_cpu.decode(q, cache)
    group.k_step = group.k_step.contiguous().clone()
    turbo_cpu.decode(q, cache)
    group.v_zero = group.v_zero[:, :, :1].contiguous()  # 3 blocks of codes, 1 of V's zeros
    with pytest.raises(ValueError, match=r"cache: expected the 4-bit group's v_zero for at least 3 blocks, got 1"):
        turbo_cpu.decode(q, cache)


def test_smoothing_bad_inputs(turbo_cpu, rng, qkv):
    """The public smoothing method checks its K too: an unsupported head dim would leave channels unwritten."""
    _, k, _ = qkv
    with pytest.raises(ValueError, match=r"k: head_dim 96 is not supported"):
        turbo_cpu.smoothing(torch.from_numpy(random_qkv(rng, 1, 2, 2, 1, 16, 96)[1]), "float32")
    with pytest.raises(ValueError, match="k: expected rank 4"):
        turbo_cpu.smoothing(k[0], "float32")
    with pytest.raises(TypeError, match=r"k: expected dtype float16 \(the dtype argument\)"):
        turbo_cpu.smoothing(k, "float16")
    mean, factor = turbo_cpu.smoothing(k, "float32")
    assert mean.shape == factor.shape == (1, 2, 64)


def test_misaligned_inputs_reach_the_kernels_as_aligned_copies(turbo_cpu, rng):
    """TVM's kernels load aligned vectors (AVX-512 here): a tensor whose data starts off a 64-byte boundary
    (a view into a larger tensor; numpy aligns to 16 bytes) faulted in them. It now reaches them as an aligned
    copy, with the same result; an aligned tensor is passed as it is (zero copy)."""
    from turbotvm.validation import aligned

    q, k, v = (torch.from_numpy(x).clone() for x in random_qkv(rng, 1, 4, 2, 64, 64, 64))
    expected = turbo_cpu.prefill(q, k, v)

    def shifted(x, elements):
        """x's values in a contiguous view starting ``elements`` past a 64-byte aligned allocation."""
        view = torch.empty(x.numel() + elements, dtype=x.dtype)[elements:].view(x.shape)
        view.copy_(x)
        return view

    q16, k16, v16 = (shifted(x, 4) for x in (q, k, v))  # 16 bytes past a boundary, as numpy may give
    assert all(x.data_ptr() % 64 == 16 and x.is_contiguous() for x in (q16, k16, v16))
    assert aligned(q16).data_ptr() % 64 == 0 and torch.equal(aligned(q16), q16)
    assert aligned(q).data_ptr() == q.data_ptr()
    assert torch.equal(turbo_cpu.prefill(q16, k16, v16), expected)
    assert np.array_equal(turbo_cpu.prefill(q16.numpy(), k16.numpy(), v16.numpy()), expected.numpy())
