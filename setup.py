"""Build script: compiles the C++ (and, where possible, CUDA) kernels ahead of time.

Environment variables read here:
  DDRS_EXT_BUILD_CUDA  "1": build the CUDA kernels (fails if the toolkit is missing);
                       "0": never build them; unset: build them when torch is a CUDA
                       build and a CUDA toolkit is found (no GPU needed to compile).
  DDRS_EXT_JIT         "1": skip compiling here; the kernels compile on first import.
  CUDA_HOME            root of the CUDA toolkit (the folder holding bin/nvcc); read by
                       torch.utils.cpp_extension.
  TORCH_CUDA_ARCH_LIST GPU architectures to compile for, e.g. "8.0;9.0" (torch's variable).
  MAX_JOBS             parallel compile jobs (torch's variable).

Without torch importable at build time (pip's default isolated build) nothing is
compiled either: the sources ship inside the package and ddrs_ext compiles and
caches them the first time it is imported.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

# Kept in step with ddrs_ext/_loader.py, which uses the same flags when compiling at import.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17"]


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package so that ddrs_ext can compile itself at import."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "ddrs_ext" / "csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "__pycache__", "README.md"))


def _want_cuda(torch, cpp_extension):
    flag = os.environ.get("DDRS_EXT_BUILD_CUDA")
    if flag == "0":
        return False
    found = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1":
        if not found:
            raise RuntimeError(
                "DDRS_EXT_BUILD_CUDA=1 but no CUDA build of torch with a CUDA toolkit was found; "
                "set CUDA_HOME to the toolkit root (the folder with bin/nvcc)"
            )
        return True
    return found


def _extensions():
    if os.environ.get("DDRS_EXT_JIT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    sources = ["csrc/ops.cpp", *sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp"))]
    common = {"name": "ddrs_ext._C", "include_dirs": [str(CSRC)], "extra_link_args": ["-fopenmp"]}
    if _want_cuda(torch, cpp_extension):
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.c*"))
        ext = cpp_extension.CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": CXX_FLAGS + ["-DDDRS_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": CXX_FLAGS}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


extensions, build_cmds = _extensions()
setup(ext_modules=extensions, cmdclass={"build_py": BuildPyWithSources, **build_cmds})
