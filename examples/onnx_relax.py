"""One torch attention layer -> ONNX -> Relax, its attention swapped for TurboAttention's INT8 kernels, built
for the CPU and compared with torch in float64."""

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from turbotvm.onnx_relax import RelaxRunner, build_relax, import_onnx, rewrite_attention
from turbotvm.testing import cosine


class CausalSelfAttention(nn.Module):
    def __init__(self, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        dim = heads * head_dim
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = (t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(dim, -1))
        scores = (q @ k.transpose(-2, -1)) / self.head_dim**0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, dim))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    parser.add_argument("--tokens", type=int, default=130)
    args = parser.parse_args(argv)
    layer = CausalSelfAttention(args.heads, args.head_dim).eval()
    x = torch.randn(1, args.tokens, args.heads * args.head_dim) * 2
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        path = Path(tmp) / "layer.onnx"
        torch.onnx.export(layer, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
        mod = import_onnx(path)
    mod, report = rewrite_attention(mod)
    print(report)
    out = RelaxRunner(build_relax(mod))(x)
    with torch.no_grad():
        cos = cosine(out, copy.deepcopy(layer).double()(x.double()).numpy())
    print(f"cos vs exact attention (float64 torch): {cos:.6f}")
    return {"replaced": len(report.replaced), "cos": cos}


if __name__ == "__main__":
    main()
