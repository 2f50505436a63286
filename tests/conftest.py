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


@pytest.fixture
def rng(request):
    """Fresh random inputs each run; the seed is printed on failure to reproduce."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)
