"""``TurboCache``: a transformers ``Cache`` whose attention layers keep a compressed ``TurboKVCache``.

``model.generate(ids, **cache_kwargs(model, TurboCache(model.config)))`` then stores K/V at 4 bits, or mixed 2/4
bits per KV head (``share_2bit``), and every decode step runs ``turbotvm.turbo_decode`` over it.

How a layer serves a forward call (``TurboLayer.attend``, called by the ``"turbo"`` attention function):

- empty layer (the prompt): INT8 prefill over the exact K/V, then the K/V go into the compressed cache;
- one new token: append it, then decode over the cache;
- several new tokens on a filled cache (a follow-up prompt, or teacher-forced scoring): each token is
  appended and decoded in turn, so token i sees exactly the tokens up to i (causal) through the cache.

``update`` only records the new K/V and returns them tagged with the layer (attribute ``_turbotvm_layer``
on the key tensor); the attention function hands them back to ``attend``. So this cache works only with
``attn_implementation="turbo"``: the constructor checks it, and an update never attended is an error.

Layers the kernels cannot serve (sliding window, chunked attention, a head dim with no kernel) get
transformers' own exact layer classes, with a warning. Beam search and cropping (assisted decoding) would
need to edit compressed blocks: they raise.
"""

from __future__ import annotations

import warnings

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..algorithm import SUPPORTED_HEAD_DIMS
from ..attention import TurboAttention
from ..kv_cache import TurboKVCache
from ..ops import turbo_attention, turbo_decode
from .hf_attention import ATTN_IMPLEMENTATION


class TurboLayer(CacheLayerMixin):
    """One attention layer's compressed K/V (a ``TurboKVCache``) behind transformers' layer interface."""

    is_sliding = False
    is_croppable = False

    def __init__(self, head_bits=None, share_2bit: float = 0.0, runtime: TurboAttention | None = None,
                 reserve_tokens: int = 0):
        super().__init__()
        self._cache_args = dict(head_bits=head_bits, share_2bit=None if head_bits is not None else share_2bit,
                                runtime=runtime, reserve_tokens=reserve_tokens)
        self.kv = TurboKVCache(**self._cache_args)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ transformers' layer interface

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending is not None:
            raise RuntimeError("TurboCache: the previous update of this layer was never attended; TurboCache needs "
                               f"attn_implementation={ATTN_IMPLEMENTATION!r}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        key_states._turbotvm_layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.kv.length + (0 if self._pending is None else self._pending[0].shape[2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv, self._pending, self.is_initialized = TurboKVCache(**self._cache_args), None, False

    def offload(self):
        raise NotImplementedError("TurboCache: offloading is not supported")

    def prefetch(self):
        raise NotImplementedError("TurboCache: offloading is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TurboCache: cropping compressed blocks (assisted decoding) is not supported")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("TurboCache: beam search (reordering compressed blocks) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError("TurboCache: expanding the batch of a compressed cache is not supported")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("TurboCache: selecting batch rows of a compressed cache is not supported")

    # ------------------------------------------------------------------ attention

    def attend(self, q: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, scale) -> torch.Tensor:
        """Attention of q [B,H,N,D] (contiguous) over the cache plus the pending K/V, which it then holds."""
        if self._pending is None or self._pending[0] is not key_states:
            raise RuntimeError("TurboCache: attend() got K/V that are not this layer's pending update")
        self._pending = None
        k, v = key_states.contiguous(), value_states.contiguous()
        if self.kv.length == 0:
            out = turbo_attention(q, k, v, causal=True, scale=scale)
            self.kv.append(k, v)
            return out
        outs = []
        for i in range(q.shape[2]):
            self.kv.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
            outs.append(turbo_decode(q[:, :, i:i + 1].contiguous(), self.kv, scale=scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class TurboCache(Cache):
    """Compressed KV cache for a transformers model with ``attn_implementation="turbo"``.

    share_2bit: fraction of each layer's KV heads stored at 2 bits (the lowest gap*std priority on the
    prompt; ``turbotvm.select_head_bits``); 0 (default) stores every head at 4 bits. head_bits: explicit
    bits per KV head instead (the same for every layer). reserve_tokens: prompt + new tokens, to allocate
    the compressed storage once. runtime: the TurboAttention to use (default: the one for the device).
    """

    def __init__(self, config, share_2bit: float = 0.0, head_bits=None, reserve_tokens: int = 0,
                 runtime: TurboAttention | None = None):
        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError(f"config: TurboCache needs attn_implementation={ATTN_IMPLEMENTATION!r} (the attention "
                             f"function that reads it), got {getattr(config, '_attn_implementation', None)!r}")
        text_config = config.get_text_config(decoder=True)
        if not getattr(text_config, "is_causal", True):
            raise ValueError("config: TurboCache serves causal decoders only")
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        head_dims = runtime.config.head_dims if runtime is not None else SUPPORTED_HEAD_DIMS
        layers = []
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text_config)
        if isinstance(per_layer_kwargs, dict):  # transformers < 5.24: one kwargs dict for every layer
            per_layer_kwargs = [per_layer_kwargs] * len(layer_types)
        for index, (layer_type, kwargs) in enumerate(zip(layer_types, per_layer_kwargs)):
            if layer_type == "full_attention" and head_dim in head_dims:
                layers.append(TurboLayer(head_bits, share_2bit, runtime, reserve_tokens))
                continue
            reason = f"head dim {head_dim} (kernels: {head_dims})" if layer_type == "full_attention" else layer_type
            warnings.warn(f"turbotvm: TurboCache layer {index} ({reason}) keeps exact K/V", RuntimeWarning, stacklevel=2)
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)

    def turbo_layers(self) -> list[TurboLayer]:
        return [layer for layer in self.layers if isinstance(layer, TurboLayer)]

    def nbytes(self) -> int:
        """Bytes of the compressed layers (codes, scales, zeros, offsets, open blocks)."""
        return sum(layer.kv.nbytes() for layer in self.turbo_layers())

    def fp16_nbytes(self) -> int:
        """Bytes the same K/V take in fp16."""
        return sum(layer.kv.fp16_nbytes() for layer in self.turbo_layers())
