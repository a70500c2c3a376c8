"""leanq: make causal language models leaner — quantize, measure, run."""

__version__ = "0.1.0"

from .api import QuantizedModel, evaluate, load, quantize  # noqa: E402
from .config import MethodConfig, QuantSpec, Recipe  # noqa: E402
from .errors import LeanqError  # noqa: E402

__all__ = ["quantize", "load", "evaluate", "QuantizedModel", "QuantSpec", "MethodConfig", "Recipe", "LeanqError",
           "__version__"]
