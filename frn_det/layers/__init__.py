from .frn import TLU, FilterResponseNorm2d, frn, frn_reference, resolve_impl

__all__ = ["FilterResponseNorm2d", "TLU", "frn", "frn_reference", "resolve_impl"]
