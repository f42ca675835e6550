"""FRN and TLU: the layers and the functional form (fused op or plain-PyTorch reference). Needs torch only."""
from .filter_response_norm import TLU, FilterResponseNorm2d, frn, frn_reference
from .onnx_export import register_symbolic

register_symbolic()  # frn_det::frn exports to ONNX as standard operators

__all__ = ["FilterResponseNorm2d", "TLU", "frn", "frn_reference"]
