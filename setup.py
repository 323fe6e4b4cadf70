"""Install cmfast: `pip install -e .` (add `[test]` for the test suite).

The C++/CUDA extension in csrc/ (cmfast._C) is optional. It is built only when csrc/ has sources, PyTorch is
importable at build time (use `pip install --no-build-isolation` so it is) and CMFAST_SKIP_EXT is not set; in every
other case the pure-Python package installs and a message says why. CUDAExtension (csrc/**/*.cu too) is chosen when
nvcc and the CUDA headers exist, whether or not a GPU is present; CppExtension otherwise, or with CMFAST_EXT_CUDA=0.
Without a GPU to ask and without TORCH_CUDA_ARCH_LIST, the CUDA code is built for sm_90 (H100) plus PTX for newer GPUs.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _cuda_home() -> str | None:
    """The CUDA toolkit folder for torch.utils.cpp_extension: CUDA_HOME/CUDA_PATH, else the folder above nvcc (or
    /usr/local/cuda) that holds cuda_runtime.h. PyTorch takes the folder above nvcc as is, which is wrong when nvcc is a
    wrapper script (e.g. /usr/local/bin/nvcc)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for folder in [*candidates, "/usr/local/cuda"]:
        if os.path.exists(os.path.join(folder, "include", "cuda_runtime.h")) and (
            nvcc or os.path.exists(os.path.join(folder, "bin", "nvcc"))
        ):
            return folder
    return None


def _extension_build():
    """(ext_modules, cmdclass) for csrc/, or ([], {}) with a printed reason."""
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    reason = None
    if os.environ.get("CMFAST_SKIP_EXT") == "1":
        reason = "CMFAST_SKIP_EXT=1"
    elif not sources:
        reason = "csrc/ has no sources yet"
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        reason = "no C++ compiler (c++ or $CXX) on PATH"
    cuda_home = _cuda_home() if os.environ.get("CMFAST_EXT_CUDA", "1") != "0" else None
    if cuda_home and not reason:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    if not reason:
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError:
            reason = "PyTorch is not importable at build time (use pip install --no-build-isolation)"
    if reason:
        print(f"cmfast: skipping the C++/CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    cuda = cuda_home is not None and cpp_extension.CUDA_HOME is not None
    if cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
    if not cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    what = "CPU and CUDA" if cuda else "CPU only"
    print(f"cmfast: building cmfast._C ({what}) from {' '.join(sources)}", file=sys.stderr)
    os.environ.setdefault("MAX_JOBS", "2")
    ext = kind(
        "cmfast._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    name="cmfast",
    version="0.1.0",
    description="A fast engine for consistency models: one-step sampling, distillation, training and editing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cmfast", "cmfast.*"]),
    package_data={"cmfast": ["assets/*.safetensors", "assets/*.md"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "lpips>=0.1.4",
        "pillow>=9.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "scikit-learn>=1.2",  # the built-in digits dataset
        "torch-fidelity>=0.4",  # FID/KID/IS/precision-recall and the TF-Inception port
    ],
    extras_require={
        # diffusers: ConsistencyModelPipeline interop (cmfast.accelerate) and bench's diffusers rows; the layout
        # itself (export --format diffusers, loading pipeline folders) needs only safetensors
        "diffusers": ["diffusers>=0.32"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "ruff>=0.4", "matplotlib>=3.5", "diffusers>=0.32"],
    },
    entry_points={"console_scripts": ["cmfast = cmfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
