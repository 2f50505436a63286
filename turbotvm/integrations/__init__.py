"""Bridges from other frameworks to the TurboAttention kernels.

- ``turbotvm.integrations.transformers``: ``attn_implementation="turbo"`` and a compressed-KV ``TurboCache``
  for Hugging Face transformers (needs the ``[models]`` extra).
- ``turbotvm.integrations.onnx``: ONNX attention subgraphs rewritten to the TurboAttention kernels in Relax.

Nothing is imported here, so ``import turbotvm`` does not need transformers or onnx.
"""
