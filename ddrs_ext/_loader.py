"""Finds ddrs_ext's compiled kernels, compiling them on first use when needed.

A wheel or `pip install --no-build-isolation .` ships them ready as
`ddrs_ext/_C*.so`. Otherwise (an isolated build without torch, a source
checkout, or a torch upgrade that broke the binary's ABI) the C++ sources that
ship inside the package are compiled with torch.utils.cpp_extension and ninja,
once, into a cache directory keyed by the sources and the torch version.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
# Kept in step with setup.py.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17"]

how_loaded: str = ""


def _source_dir() -> Path:
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise ImportError(
        "ddrs_ext: neither compiled kernels nor their C++ sources were found; "
        "reinstall the package with `pip install ddrs_ext` or from a source checkout"
    )


def _cache_root() -> Path:
    env = os.environ.get("DDRS_EXT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ddrs_ext"


def _jit_build(reason: str) -> None:
    from torch.utils import cpp_extension

    src = _source_dir()
    sources = [src / "ops.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted((src / "cuda").glob("*.cpp")) + sorted((src / "cuda").glob("*.cu"))
    digest = hashlib.sha256()
    headers = [p for p in src.rglob("*") if p.suffix in {".h", ".cuh"}]
    for path in sorted(set(headers) | set(sources)):
        digest.update(path.relative_to(src).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    tag = f"torch{torch.__version__}-{python}-{'cuda' if with_cuda else 'cpu'}"
    build_dir = _cache_root() / f"{tag}-{digest.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("ddrs_ext_C*.so")):
        print(
            f"ddrs_ext: compiling the C++{'/CUDA' if with_cuda else ''} kernels ({reason}); "
            f"this happens once and takes about a minute. Cache: {build_dir}",
            file=sys.stderr,
        )
    cflags = CXX_FLAGS + (["-DDDRS_WITH_CUDA"] if with_cuda else [])
    try:
        cpp_extension.load(
            name="ddrs_ext_C",
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # a compiler or ninja problem: say what to do
        raise ImportError(
            "ddrs_ext could not compile its C++ kernels. It needs a C++17 compiler (g++ or clang++) "
            "and the `ninja` package; install them, or install ddrs_ext with "
            "`pip install --no-build-isolation .` next to an installed torch so they compile at install "
            f"time. The compiler said: {exc}"
        ) from exc


def load() -> str:
    """Registers the torch.ops.ddrs_ext operators; returns how ("prebuilt" or "jit")."""
    global how_loaded
    if how_loaded:
        return how_loaded
    if os.environ.get("DDRS_EXT_JIT") == "1":
        _jit_build("DDRS_EXT_JIT=1")
        how_loaded = "jit"
        return how_loaded
    try:
        from ddrs_ext import _C  # noqa: F401

        how_loaded = "prebuilt"
    except ImportError as exc:
        prebuilt = list(_PACKAGE_DIR.glob("_C*.so"))
        reason = (
            f"the prebuilt library does not load with torch {torch.__version__}: {exc}"
            if prebuilt
            else "this install has no prebuilt kernels"
        )
        _jit_build(reason)
        how_loaded = "jit"
    return how_loaded
