"""ONNX -> Relax -> TurboAttention (turbotvm.onnx_relax): torch attention layers exported with the TorchScript
exporter, imported, rewritten, built for the CPU and run; outputs against float64 torch (exact attention)
and against the float64 reference of the same algorithm on torch's own Q/K/V projections."""

import copy
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm_ffi
from torch import nn

from turbotvm import reference as ref
from turbotvm.onnx_relax import RelaxRunner, build_relax, import_onnx, rewrite_attention
from turbotvm.testing import cosine

EXACT = 0.999  # TurboAttention vs exact attention
SAME_ALGORITHM = 0.9999  # vs reference.py on the same Q/K/V (float32 projections vs torch's)
FLOAT32 = 0.99999  # an attention left exact: float32 Relax vs float64 torch
INPUT_STD = 2.5  # logits of std ~2 on the default Linear init: peaked rows, so a wrong scale or mask shows
ROOT = Path(__file__).resolve().parents[1]


class Layer(nn.Module):
    """One attention layer: q/k/v projections, heads, attention (explicit or SDPA), output projection."""

    def __init__(self, heads, head_dim, causal=False, sdpa=False, scale=None, mask=None):
        super().__init__()
        self.heads, self.head_dim, self.causal, self.sdpa, self.scale = heads, head_dim, causal, sdpa, scale
        self.dim = heads * head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(self.dim, self.dim) for _ in range(4))
        self.register_buffer("mask", mask)  # SDPA: boolean (True = visible); explicit: additive

    def split(self, x):
        b, n, _ = x.shape
        return [p(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v)]

    def attend(self, q, k, v):
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal, scale=self.scale)
        s = q @ k.transpose(-2, -1)
        s = s / self.head_dim**0.5 if self.scale is None else s * self.scale
        if self.causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        if self.mask is not None:
            s = s + self.mask
        return s.softmax(-1) @ v

    def merge(self, y):
        b, h, n, d = y.shape
        return self.o(y.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x):
        return self.merge(self.attend(*self.split(x)))


def export(model, example, tmp_path, **kwargs):
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model.eval(), (example,), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], **kwargs)
    return path


def exact_output(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double()).numpy()


def same_algorithm_output(layer, x, causal, scale):
    """reference.turbo_prefill on torch's float32 Q/K/V, then the output projection in float64."""
    with torch.no_grad():
        q, k, v = (t.numpy() for t in layer.split(x))
        out = ref.turbo_prefill(q, k, v, causal, scale)
        return copy.deepcopy(layer).double().merge(torch.from_numpy(out)).numpy()


def seeded(rng):
    torch.manual_seed(int(rng.integers(2**31)))


@pytest.mark.parametrize("sdpa, causal, heads, tokens, scale", [
    pytest.param(False, False, 2, 64, None, id="matmul-full-N64"),
    pytest.param(False, True, 3, 130, None, id="matmul-causal-N130"),
    pytest.param(True, False, 4, 77, None, id="sdpa-full-N77"),
    pytest.param(True, True, 2, 130, 0.2, id="sdpa-causal-N130-scale0.2"),
])
def test_attention_replaced(tmp_path, rng, sdpa, causal, heads, tokens, scale):
    seeded(rng)
    layer = Layer(heads, 64, causal, sdpa, scale)
    x = torch.randn(2, tokens, layer.dim) * INPUT_STD
    mod, report = rewrite_attention(import_onnx(export(layer, x, tmp_path)))
    assert len(report.replaced) == 1 and report.left_exact == [], report
    att = report.replaced[0]
    assert (att.head_dim, att.causal, att.dtype) == (64, causal, "float32")
    assert att.scale == pytest.approx(64**-0.5 if scale is None else scale, rel=1e-6)
    assert "R.nn.softmax" not in mod["main"].script() and "prefill_" in mod["main"].script()
    out = RelaxRunner(build_relax(mod))(x)
    exact, same = exact_output(layer, x), same_algorithm_output(layer, x, causal, att.scale)
    print(f"{report}: vs reference cos={cosine(out, same):.10f}, vs exact cos={cosine(out, exact):.6f}")
    assert out.shape == exact.shape
    assert cosine(out, same) >= SAME_ALGORITHM
    assert cosine(out, exact) >= EXACT


def test_symbolic_sequence_length(tmp_path, rng):
    """Dynamic batch and tokens: the full attention is replaced; a causal mask built from the shape stays exact."""
    seeded(rng)
    layer = Layer(2, 64)
    dynamic = {"x": {0: "b", 1: "n"}, "y": {0: "b", 1: "n"}}
    path = export(layer, torch.zeros(1, 64, layer.dim), tmp_path, dynamic_axes=dynamic)
    mod, report = rewrite_attention(import_onnx(path))
    assert len(report.replaced) == 1
    run = RelaxRunner(build_relax(mod))
    for batch, tokens in ((1, 64), (2, 131)):
        x = torch.randn(batch, tokens, layer.dim) * INPUT_STD
        assert cosine(run(x), exact_output(layer, x)) >= EXACT
    causal = Layer(2, 64, causal=True)
    path = export(causal, torch.zeros(1, 64, layer.dim), tmp_path, dynamic_axes={"x": {1: "n"}, "y": {1: "n"}})
    with pytest.warns(UserWarning, match="not a constant"):
        _, report = rewrite_attention(import_onnx(path))
    assert report.replaced == [] and len(report.left_exact) == 1


def test_model_without_attention_unchanged(tmp_path):
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    path = export(mlp, torch.zeros(4, 64), tmp_path)
    mod = import_onnx(path)
    with pytest.warns(UserWarning, match="no attention pattern"):
        out, report = rewrite_attention(mod)
    assert report.replaced == [] and report.left_exact == []
    # a fresh import to compare with (the rewrite folds constants, which would change this module's transposes)
    assert tvm_ffi.structural_equal(out, import_onnx(path))


def test_unsupported_head_dim_stays_exact(tmp_path, rng):
    seeded(rng)
    layer = Layer(4, 32, causal=True)
    x = torch.randn(1, 70, layer.dim) * INPUT_STD
    with pytest.warns(UserWarning, match="head dim 32 is not supported"):
        mod, report = rewrite_attention(import_onnx(export(layer, x, tmp_path)))
    assert report.replaced == [] and len(report.left_exact) == 1
    assert cosine(RelaxRunner(build_relax(mod))(x), exact_output(layer, x)) >= FLOAT32


def test_three_of_four_attentions_replaced(tmp_path, rng):
    """Four layers: causal; full; full with another scale (a second specialized kernel); head dim 32 (exact)."""
    seeded(rng)
    model = nn.Sequential(Layer(2, 64, causal=True), Layer(2, 64), Layer(2, 64, scale=0.1), Layer(4, 32))
    with torch.no_grad():
        for layer in model[:-1]:
            layer.o.weight *= 3  # larger inputs to the next layer: its rows not near-uniform
    x = torch.randn(1, 96, 128) * INPUT_STD
    with pytest.warns(UserWarning, match="head dim 32"):
        mod, report = rewrite_attention(import_onnx(export(model, x, tmp_path)))
    assert [(a.causal, round(a.scale, 6)) for a in report.replaced] == [(True, 0.125), (False, 0.125), (False, 0.1)]
    assert len(report.left_exact) == 1 and mod["main"].script().count("R.nn.softmax") == 1
    assert sum(gv.name_hint.startswith("prefill_") for gv in mod.get_global_vars()) == 3
    cos = cosine(RelaxRunner(build_relax(mod))(x), exact_output(model, x))
    print(f"four layers vs exact cos={cos:.6f}")
    assert cos >= EXACT


@pytest.mark.parametrize("kind", ["additive bias", "sliding window"])
def test_other_masks_stay_exact(tmp_path, rng, kind):
    seeded(rng)
    n = 70
    if kind == "additive bias":  # explicit code: s + bias, a float mask that is not 0/-inf
        layer, reason = Layer(2, 64, mask=torch.randn(n, n)), "entries other than 0"
    else:  # SDPA boolean mask (a 0/-inf additive constant after export) that is neither causal nor full
        i = torch.arange(n)
        window = (i[None] <= i[:, None]) & (i[None] > i[:, None] - 16)
        layer, reason = Layer(2, 64, sdpa=True, mask=window), "neither causal nor all-visible"
    x = torch.randn(1, n, layer.dim) * INPUT_STD
    with pytest.warns(UserWarning, match=reason):
        mod, report = rewrite_attention(import_onnx(export(layer, x, tmp_path)))
    assert report.replaced == [] and len(report.left_exact) == 1
    assert cosine(RelaxRunner(build_relax(mod))(x), exact_output(layer, x)) >= FLOAT32


def test_example_runs():
    spec = importlib.util.spec_from_file_location("onnx_relax_example", ROOT / "examples/onnx_relax.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--heads", "2", "--tokens", "70"])
    assert result["replaced"] == 1 and result["cos"] >= EXACT
