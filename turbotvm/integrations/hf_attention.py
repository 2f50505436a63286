"""The ``"turbo"`` attention function for transformers' ``AttentionInterface``.

Prefill runs ``turbotvm.turbo_attention`` (INT8 Q/K/V, SAS softmax) over the K/V transformers passes in.
When those K/V come from a ``TurboCache`` layer, that layer attends instead: prefill, then decode over its
compressed 4-bit / mixed 2/4-bit cache (``turbotvm.integrations.hf_cache``).

What the kernels cannot serve (a head dim that was not built, sliding windows, ALiBi or other position
biases, logit softcapping, attention sinks, dropout in training, a padding or custom mask) runs the
model's own exact attention instead, with one warning per reason: never a silently different result.
"""

from __future__ import annotations

import sys
import warnings

import torch

from ..ops import turbo_attention
from ..runtimes import runtime_for
from ..validation import _TORCH_DTYPE_NAMES

#: The name models take: ``from_pretrained(..., attn_implementation=ATTN_IMPLEMENTATION)``.
ATTN_IMPLEMENTATION = "turbo"

#: kwargs of the attention call that change the math in ways the kernels do not implement.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit softcapping",
    "position_bias": "a position bias (ALiBi, T5)",
    "alibi": "ALiBi",
    "sinks": "attention sinks",
    "s_aux": "attention sinks",
    "sliding_window": "sliding-window attention",
}

_warned: set[str] = set()


class TurboCacheUnsupported(RuntimeError):
    """A TurboCache layer got a call it cannot serve: it keeps no exact K/V to fall back on."""


def register() -> None:
    """Register ``"turbo"`` with transformers' attention and mask interfaces (idempotent).

    The mask function is SDPA's: it gives None for a plain causal mask and a boolean mask otherwise, which
    ``turbo_attention_forward`` checks. Without a registered mask function transformers would pass no mask
    at all, and padding would be ignored.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, turbo_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def turbo_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            is_causal=None, **kwargs):
    """transformers attention: query [B,H,N,D], key/value [B,H_kv,M,D] -> ([B,N,H,D], None)."""
    is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    layer = getattr(key, "_turbotvm_layer", None)
    reason = unsupported_reason(module, query, key, value, dropout, kwargs)
    causal = None
    if reason is None:
        kv_len = key.shape[2] if layer is None else layer.get_seq_length()  # a TurboLayer passes only new K/V
        causal, reason = _mask_as_causal_flag(attention_mask, is_causal, query.shape[2], kv_len)
    if reason is not None:
        if layer is not None:
            raise TurboCacheUnsupported(
                f"TurboCache layer {getattr(module, 'layer_idx', '?')}: cannot serve {reason}; it keeps no exact K/V to "
                "fall back on. Use equal-length prompts (no padding) or a DynamicCache for this call.")
        _warn_once(module, reason)
        return exact_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    q = query.contiguous()
    if layer is not None:
        out = layer.attend(q, key, value, scaling)
    else:
        if causal and attention_mask is None and 1 < q.shape[2] < key.shape[2]:
            # only an empty StaticCache at prefill gets here: the keys past the prompt are unused slots (as in SDPA)
            key, value = key[:, :, : q.shape[2]], value[:, :, : q.shape[2]]
        out = turbo_attention(q, key.contiguous(), value.contiguous(), causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def unsupported_reason(module, query, key, value, dropout, kwargs) -> str | None:
    """Why the kernels cannot serve this call (a phrase for the warning), or None if they can."""
    for name, reason in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            return reason
    if getattr(module, "sliding_window", None) is not None:
        return "sliding-window attention"
    if getattr(module, "sinks", None) is not None:
        return "attention sinks"
    if dropout and module.training:
        return "attention dropout in training"
    if kwargs.get("output_attentions"):
        return "output_attentions (the kernels return no attention weights)"
    if query.device.type not in ("cpu", "cuda"):
        return f"tensors on {query.device.type}"
    if query.dtype not in _TORCH_DTYPE_NAMES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return f"head dims q {d}, k {key.shape[-1]}, v {value.shape[-1]} (the kernels need one)"
    head_dims = runtime_for(query.device).config.head_dims
    if d not in head_dims:
        return f"head dim {d} (the kernels are built for {head_dims})"
    if query.shape[0] != key.shape[0] or query.shape[1] % key.shape[1]:
        return f"batch/heads q {tuple(query.shape[:2])} vs k {tuple(key.shape[:2])}"
    return None


def _mask_as_causal_flag(mask, is_causal: bool, q_len: int, kv_len: int) -> tuple[bool | None, str | None]:
    """(causal flag for the kernels, None), or (None, reason) when the mask is not plain (bottom-right) causal."""
    if mask is None:
        return is_causal, None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        return None, f"an attention mask of type {type(mask).__name__}"
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    bottom_right = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    if bool(torch.all(visible == bottom_right)):
        return True, None
    if bool(torch.all(visible)):
        return False, None
    return None, "an attention mask with padding or a custom pattern"


def _warn_once(module, reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"turbotvm: {type(module).__name__} layers with {reason} run exact attention instead of "
                      "TurboAttention", RuntimeWarning, stacklevel=4)


def exact_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """The model's own eager attention (it knows the model's quirks: sinks, softcapping), with the mask made
    explicit: the SDPA-style mask (None = causal, boolean) becomes an additive one. Without an eager function
    in the model's module, transformers' SDPA attention."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        attention_mask = visible.tril(kv_len - q_len)[None, None] if is_causal else None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
