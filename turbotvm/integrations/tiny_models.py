"""Tiny random-init transformers models and a byte tokenizer: the integration's tests, and the examples' and
benchmarks' ``--model tiny`` setting, run in seconds without model weights."""

from __future__ import annotations

import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256), with the call/decode shape of a transformers tokenizer."""

    vocab_size = 256
    eos_token_id = None

    def __call__(self, text: str, return_tensors: str = "pt") -> dict:
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_config(model_type: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64,
                **overrides):
    """A small config of a supported architecture (vocabulary 256: ``ByteTokenizer``)."""
    from transformers import AutoConfig

    values = dict(vocab_size=256, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
                  # bytes have no special tokens: an inherited eos id (2 for llama) ended random generations early
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    values.update(overrides)
    return AutoConfig.for_model(model_type, **values)


def tiny_model(config=None, seed: int = 0, attn_implementation: str = "sdpa"):
    """A random-init causal LM for ``config`` (default: ``tiny_config()``), in eval mode.

    The default init (std 0.02) gives near-uniform logits, where greedy tokens tie; std 0.05 gives
    input-dependent predictions and attention that is not uniform, without the very peaky attention of
    larger weights (which amplifies any K error far beyond what trained models show).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config() if config is None else config
    config.initializer_range = 0.05
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
