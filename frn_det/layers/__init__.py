"""FRN and TLU: the layers, the functional forms and the fused op. Needs torch only."""
from .frn import TLU, FilterResponseNorm2d, frn, frn_fused, frn_reference, resolve_impl
from .onnx_export import register_symbolic
from .validation import check_frn_args

register_symbolic()  # frn_det::frn exports to ONNX as standard operators

__all__ = ["FilterResponseNorm2d", "TLU", "check_frn_args", "frn", "frn_fused", "frn_reference", "resolve_impl"]
