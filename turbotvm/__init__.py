"""turbotvm: TurboAttention (FlashQ INT8/INT4/INT2 + SAS softmax) compiled through Apache TVM."""

__version__ = "0.1.0"

from .attention import TurboAttention  # noqa: E402
from .calibration import select_head_bits  # noqa: E402

__all__ = ["TurboAttention", "select_head_bits", "__version__"]
