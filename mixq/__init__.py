"""mixq: learned mixed-precision quantization of CNNs under hard byte budgets.

The public API is what this module re-exports; everything else is internal.
"""

from .config import LayerRule as LayerRule
from .config import QuantConfig as QuantConfig
from .config import QuantizerConfig as QuantizerConfig
from .config import parse_bytes as parse_bytes
from .convert import calibrate_ as calibrate_
from .convert import fold_bn_ as fold_bn_
from .convert import prepare_ as prepare_
from .convert import quant_plan as quant_plan
from .convert import quant_sites as quant_sites
from .layers import ActQuant as ActQuant
from .layers import QConv2d as QConv2d
from .layers import QLinear as QLinear
from .quantizers import Pow2Quantizer as Pow2Quantizer
from .quantizers import UniformQuantizer as UniformQuantizer
from .size import SizeAccount as SizeAccount
from .size import format_report as format_report
from .size import measure_ as measure_
from .size import size_report as size_report

__version__ = "0.1.0"
