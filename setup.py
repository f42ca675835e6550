#!/usr/bin/env python
"""frn-det: Filter Response Normalization for detectron2.

Builds ``frn_det._C`` from ``frn_det/layers/csrc``: a CppExtension by default, a CUDAExtension when
CUDA is available or ``FORCE_CUDA=1`` (the CUDA toolkit is taken from ``CUDA_HOME``).
detectron2 is deliberately not in ``install_requires``: no package registry carries it under that
name; see README.md for how it is installed.
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("frn_det", "layers", "csrc")


def _wheel_cuda_include_dirs():
    """Headers the local toolkit lacks (cusparse.h, cublas*.h) ship in torch's CUDA wheels."""
    try:
        import nvidia
    except ImportError:
        return []
    roots = [os.path.join(p, sub, "include") for p in nvidia.__path__ for sub in ("cu13", "cu12")]
    return [d for d in roots if os.path.isdir(d)]


def get_extensions():
    # Paths relative to setup.py's folder so the build does not depend on the caller's cwd.
    os.chdir(HERE)
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))

    # -ffp-contract=off: the TLU mask in backward recomputes x * a + b exactly as forward did.
    extra_compile_args = {"cxx": ["-O3", "-ffp-contract=off"]}
    include_dirs = [os.path.join(HERE, CSRC)]
    extension = CppExtension
    # A toolchain that links libstdc++ statically (the GPU machines' g++ does) would put a copy of
    # it in _C's exported symbols; under Python's -Bsymbolic-functions our calls then use that
    # copy's code with the process's libstdc++ data, and formatting a number in an error message
    # crashes (H200 check, docs/gpu.md). Hiding the copy keeps code and data together.
    extra_link_args = ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []
    if torch.backends.openmp.is_available():
        # ATen's parallel_for is a header template: without -fopenmp it compiles to a serial loop, and
        # the CPU kernels would run on one thread whatever torch.set_num_threads says. Linked by
        # soname (libgomp.so.1), the process uses the OpenMP runtime torch has already loaded.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")

    use_cuda = (torch.cuda.is_available() and CUDA_HOME is not None) or os.environ.get("FORCE_CUDA", "0") == "1"
    if use_cuda:
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda).")
        extension = CUDAExtension
        sources += cuda_sources
        include_dirs += _wheel_cuda_include_dirs()
        # No --use_fast_math: rstd needs correctly rounded sqrt / division and no denormal flush.
        # --threads: the architectures of TORCH_CUDA_ARCH_LIST compile in parallel.
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--threads", str(min(4, os.cpu_count() or 1))]

    return [
        extension(
            "frn_det._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    name="frn-det",
    version="0.1.0",
    author="frn-det developers",
    description="Filter Response Normalization (FRN + TLU) for detectron2 object detection",
    python_requires=">=3.10",
    packages=find_packages(exclude=("configs", "tests", "tools", "experiments*", "benchmarks")),
    # The shipped configs (frn_det.model_zoo); frn_det/configs links to configs/. The study's grids
    # (configs/cpu_grid*) stay in the checkout with experiments/.
    package_data={"frn_det": ["configs/*.yaml", "configs/coco/**/*", "configs/synthetic/*.yaml", "configs/bccd/*.yaml", "configs/lazy/**/*.py"]},
    install_requires=["torch>=2.4", "numpy", "pycocotools", "tqdm", "matplotlib", "fvcore", "pillow"],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis"],
                    "export": ["onnx==1.23.*", "onnxruntime==1.32.*", "onnxscript==0.7.*"], "timm": ["timm"]},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
