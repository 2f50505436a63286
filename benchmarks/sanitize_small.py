"""Small prefills (causal, GQA, odd lengths) and decodes (4/2-bit + INT8 tail; mixed bits with the chosen
splits), D = 64 and 128, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_small.py
"""

import numpy as np
import torch

from turbotvm import TurboAttention
from turbotvm import reference as ref
from turbotvm.testing import cosine, random_qkv

turbo = TurboAttention.build({"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()},
                             head_dims=(64, 128), dtypes=("float16",))
rng = np.random.default_rng(0)
for d in (64, 128):
    q, k, v = (x.astype(np.float16).astype(np.float64) for x in random_qkv(rng, 1, 4, 2, 77, 130, d))
    out = turbo.prefill(*(torch.from_numpy(x).to("cuda", torch.float16) for x in (q, k, v)), causal=True)
    print(f"D={d} prefill cos vs reference", cosine(out.float().cpu().numpy(), ref.turbo_prefill(q, k, v, True)))
    q, k, v = (x.astype(np.float16).astype(np.float64) for x in random_qkv(rng, 1, 4, 2, 1, 64 * 3 + 5, d))
    cache = turbo.compress_kv(*(torch.from_numpy(x).to("cuda", torch.float16) for x in (k, v)), [4, 2])
    out = turbo.decode(torch.from_numpy(q).to("cuda", torch.float16), cache, num_splits=2)
    expected = ref.turbo_decode(q, ref.build_cache(k, v, [4, 2]), num_splits=2)
    print(f"D={d} decode cos vs reference", cosine(out.float().cpu().numpy(), expected))
# mixed bits with the chosen splits: the 2-bit launch takes more than the 4-bit one (each merges its
# own heads' slots)
head_bits = [4, 4, 4, 2] * 4
q, k, v = (x.astype(np.float16).astype(np.float64) for x in random_qkv(rng, 4, 16, 16, 1, 64 * 32 + 5, 128))
cache = turbo.compress_kv(*(torch.from_numpy(x).to("cuda", torch.float16) for x in (k, v)), head_bits)
q_cuda = torch.from_numpy(q).to("cuda", torch.float16)
splits = {bits: turbo._auto_splits(q_cuda, cache.packed_len, head_bits.count(bits)) for bits in (2, 4)}
out = turbo.decode(q_cuda, cache).float().cpu().numpy()
reference = ref.build_cache(k, v, head_bits)
for bits in (2, 4):
    heads = [h for h in range(16) if head_bits[h] == bits]
    expected = ref.turbo_decode(q, reference, num_splits=splits[bits])[:, heads]
    print(f"mixed decode, {bits}-bit heads at {splits[bits]} splits: cos vs reference", cosine(out[:, heads], expected))
torch.cuda.synchronize()
