"""turbotvm: TurboAttention (FlashQ INT8/INT4/INT2 + SAS softmax) compiled through Apache TVM."""

__version__ = "0.1.0"

from .attention import TurboAttention  # noqa: E402
from .calibration import select_head_bits  # noqa: E402
from .kv_cache import TurboKVCache  # noqa: E402
from .ops import turbo_attention, turbo_decode  # noqa: E402
from .runtimes import runtime_for, set_runtime  # noqa: E402

__all__ = ["TurboAttention", "TurboKVCache", "runtime_for", "select_head_bits", "set_runtime", "turbo_attention",
           "turbo_decode", "__version__"]
