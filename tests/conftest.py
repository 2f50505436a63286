import numpy as np
import pytest
import torch

from turbotvm import TurboAttention


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def turbo_cpu():
    """One CPU build for the whole session (head dims 64 and 128, float32)."""
    return TurboAttention.build("llvm", head_dims=(64, 128), dtypes=("float32",))


@pytest.fixture(scope="session")
def turbo_cpu_bf16():
    """CPU build with float32 and bfloat16 (head dims 64 and 128), for the torch ops and the KV cache."""
    return TurboAttention.build("llvm", head_dims=(64, 128), dtypes=("float32", "bfloat16"))


@pytest.fixture
def rng(request):
    """Fresh random inputs each run; the seed is printed on failure to reproduce."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def cpu_ops_runtime(turbo_cpu_bf16):
    """turbo_cpu_bf16 installed as the runtime of CPU tensors for one test (turbotvm.set_runtime)."""
    from turbotvm import set_runtime

    previous = set_runtime("cpu", turbo_cpu_bf16)
    yield turbo_cpu_bf16
    set_runtime("cpu", previous)
