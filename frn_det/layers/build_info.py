"""What the built extension holds: the GPU architectures of its CUDA kernels.

A CUDA build embeds a fat binary (section .nv_fatbin) of SASS for each architecture it was compiled
for, and PTX that newer GPUs can compile at load time; a GPU covered by neither fails with "no
kernel image is available". Read from the file, so it works on machines without a GPU.
"""
import glob
import os
import struct

_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
_KINDS = {1: "ptx", 2: "sass"}


def extension_path():
    """The path of frn_det._C's shared library, or None when it is not built."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = glob.glob(os.path.join(here, "_C.*.so")) + glob.glob(os.path.join(here, "_C.*.pyd"))
    return found[0] if found else None


def cuda_archs(path=None):
    """{"sass": [compute capabilities x 10], "ptx": [...]} embedded in the library (empty lists for a
    CPU-only build). Each fat binary is a header (magic, version, header size, payload size) and
    entries (kind 1 PTX / 2 ELF, header size, payload size, ..., architecture at offset 28)."""
    path = path or extension_path()
    if path is None:
        raise FileNotFoundError("frn_det._C is not built")
    with open(path, "rb") as f:
        data = f.read()
    archs = {"sass": set(), "ptx": set()}
    pos = data.find(_FATBIN_MAGIC)
    while pos >= 0:
        _, header_size, payload = struct.unpack_from("<HHQ", data, pos + 4)
        entry, end = pos + header_size, pos + header_size + payload
        while entry < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind in _KINDS:
                archs[_KINDS[kind]].add(arch)
            entry += entry_header + size
        pos = data.find(_FATBIN_MAGIC, end)
    return {k: sorted(v) for k, v in archs.items()}
