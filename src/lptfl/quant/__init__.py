"""Block-floating-point number formats and low-precision training.

Mirrors QPyTorch's split: a function (:func:`quantize`), a module (:class:`Quantizer`)
for activations/errors, an optimizer wrapper (:class:`LowPrecisionOptimizer`), plus
:func:`insert_quantizers` and the :class:`PrecisionPolicy` that gathers a run's choices.
"""

from lptfl.quant.activation import Quantizer, quantize_activation
from lptfl.quant.format import BFPFormat
from lptfl.quant.insert import insert_quantizers, quantizers_of, reseed_quantizers
from lptfl.quant.optim import LowPrecisionOptimizer
from lptfl.quant.policy import PrecisionPolicy
from lptfl.quant.quantize import quantize

__all__ = [
    "BFPFormat",
    "LowPrecisionOptimizer",
    "PrecisionPolicy",
    "Quantizer",
    "insert_quantizers",
    "quantize",
    "quantize_activation",
    "quantizers_of",
    "reseed_quantizers",
]
