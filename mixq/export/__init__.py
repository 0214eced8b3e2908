"""Export: the packed integer model (`export`, `IntModel`), bit packing, ONNX and QONNX."""

from .build import ExportError as ExportError
from .build import export as export
from .intmodel import ExportFormatError as ExportFormatError
from .intmodel import IntModel as IntModel
