"""Install cmfast: `pip install -e .` (add `[test]` for the test suite).

The C++/CUDA extension in csrc/ is optional. It is built only when csrc/ has sources, PyTorch is importable at build
time (use `pip install --no-build-isolation` so it is) and CMFAST_SKIP_EXT is not set; CUDAExtension is chosen when
nvcc exists, CppExtension otherwise. In every other case the pure-Python package installs and a message says why.
"""

import glob
import os
import sys

from setuptools import setup


def _extension_build():
    """(ext_modules, cmdclass) for csrc/, or ([], {}) with a printed reason."""
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    reason = None
    if os.environ.get("CMFAST_SKIP_EXT") == "1":
        reason = "CMFAST_SKIP_EXT=1"
    elif not sources:
        reason = "csrc/ has no sources yet"
    else:
        try:
            from torch.utils import cpp_extension
        except ImportError:
            reason = "PyTorch is not importable at build time (use pip install --no-build-isolation)"
    if reason:
        print(f"cmfast: skipping the C++/CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    cuda = cpp_extension.CUDA_HOME is not None
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    if not cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    os.environ.setdefault("MAX_JOBS", "2")
    ext = kind("cmfast._C", sources, extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    name="cmfast",
    version="0.1.0",
    description="A fast engine for consistency models: one-step sampling, distillation, training and editing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cmfast", "cmfast.networks", "cmfast.training", "cmfast.kernels"],
    package_dir={"cmfast.kernels": "kernels"},
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
    ],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "ruff>=0.4"]},
    entry_points={"console_scripts": ["cmfast = cmfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
