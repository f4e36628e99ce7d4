"""Finds ddrs_ext's compiled kernels, compiling them on first use when needed.

A wheel or `pip install --no-build-isolation .` ships them ready as
`ddrs_ext/_C*.so`. Otherwise (an isolated build without torch, a source
checkout, or a torch upgrade that broke the binary's ABI) the C++ sources that
ship inside the package are compiled with torch.utils.cpp_extension and ninja,
once, into a cache directory keyed by the sources and the torch version. Later
imports load the cached library directly (no ninja run, no cpp_extension import).

A compile cannot hang on a killed one. torch guards a build folder with a
`lock` file that only the process that made it removes, so a compile killed
mid-way (SIGKILL, a timeout) leaves it behind and every later compile waits on
it forever. ddrs_ext therefore takes its own lock first: an flock on
`ddrs_ext.lock` in the build folder, which the operating system releases when
its holder exits or dies. Whoever holds it is the only ddrs_ext compiling that
folder, so a torch `lock` found then is stale: once no compiler that the killed
process started is still running there, it is removed. All waiting is bounded
(DDRS_EXT_LOCK_TIMEOUT seconds, default 20 minutes); past that the import fails
with a message that names the process or the file in the way. Importing a
source tree that has no kernels while an installed build exists elsewhere (Python
runs in the checkout) says so before it compiles.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; torch's lock file is then only waited on, with a limit
    fcntl = None

_PACKAGE_DIR = Path(__file__).resolve().parent
# Kept in step with setup.py.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17"]

LOCK_FILE = "ddrs_ext.lock"  # ours: an flock, released by the OS when its holder dies
BUILT_FILE = "ddrs_ext.built"  # written after a complete build: the library's path, size and mtime
TORCH_LOCK_FILE = "lock"  # torch.utils.cpp_extension's FileBaton: removed only by the process that made it
DEFAULT_LOCK_TIMEOUT_S = 1200.0
# Processes that a compile started in its build folder (torch runs ninja there; ninja runs the rest).
_BUILD_TOOLS = {"ninja", "c++", "g++", "gcc", "cc", "cc1plus", "as", "ld", "collect2", "clang", "clang++"}
_BUILD_TOOLS |= {"nvcc", "cicc", "ptxas", "fatbinary", "nvlink", "cudafe++"}

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


def _lock_timeout() -> float:
    env = os.environ.get("DDRS_EXT_LOCK_TIMEOUT")
    if not env:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(env)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise ImportError(f"ddrs_ext: DDRS_EXT_LOCK_TIMEOUT must be a number of seconds > 0, got {env!r}")
    return value


def _say(message: str) -> None:
    print(f"ddrs_ext: {message}", file=sys.stderr, flush=True)


def _prebuilt_libraries(package_dir: Path) -> list[Path]:
    return sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))


def installed_elsewhere() -> Path | None:
    """Another ddrs_ext package folder, with compiled kernels, that Python could import instead of this one.

    Looked for on sys.path, through the import finders (an editable install's), and in the installed
    distribution's file list. When this package (say, a checkout's source tree, found first because
    Python runs in the checkout) has no kernels of its own, importing it compiles them although a
    built copy is installed.
    """
    candidates = [Path(entry or os.getcwd()) / "ddrs_ext" for entry in sys.path]
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec("ddrs_ext", None)
            candidates += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
        except Exception:  # a finder that cannot answer this question
            continue
    try:
        from importlib import metadata

        dist = metadata.distribution("ddrs_ext")
        candidates += [Path(dist.locate_file(f)).parent for f in dist.files or [] if f.name.startswith("_C")]
    except Exception:  # no metadata (a bare source tree), or unreadable: sys.path is enough
        pass
    for folder in candidates:
        try:
            if folder.resolve() != _PACKAGE_DIR and _prebuilt_libraries(folder):
                return folder.resolve()
        except OSError:
            continue
    return None


def _build_processes(folder: Path) -> list[str]:
    """Compilers or ninja still running in ``folder`` (Linux /proc; elsewhere none are seen)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    target = str(folder.resolve())
    found = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            name = Path(f"/proc/{entry.name}/comm").read_text().strip()
        except OSError:  # gone meanwhile, or another user's
            continue
        tool = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name  # g++-12 -> g++
        if (cwd == target or cwd.startswith(target + os.sep)) and tool in _BUILD_TOOLS:
            found.append((int(entry.name), f"pid {entry.name} ({name})"))
    return [text for _, text in sorted(found)]  # by pid: ninja, which started the others, usually first


class _FolderLock:
    """An exclusive flock on ``path``, polled for until ``deadline``; not exclusive where flock is missing."""

    def __init__(self, path: Path, deadline: float, timeout: float, poll: float) -> None:
        self.path, self.deadline, self.timeout, self.poll = path, deadline, timeout, poll
        self.fd: int | None = None
        self.exclusive = False

    def __enter__(self) -> _FolderLock:
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ImportError(
                f"ddrs_ext: cannot write the kernel cache ({exc}); set DDRS_EXT_CACHE to a writable folder"
            ) from exc
        try:
            locked = self._wait_for(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:  # this file system has no flock (some network mounts)
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {stamp})\n".encode())
        self.fd, self.exclusive = fd, True
        return self

    def _wait_for(self, fd: int) -> bool:
        """Locks ``fd``, polling until the deadline; False when flock is not supported here."""
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError:
                return False
            holder = self._holder()
            if time.monotonic() >= self.deadline:
                raise ImportError(
                    f"ddrs_ext: gave up after {self.timeout:.0f} s waiting for {holder}, which holds "
                    f"{self.path} while it compiles the kernels. If it is stuck or suspended, end it and "
                    "import again (DDRS_EXT_LOCK_TIMEOUT sets how long to wait)"
                )
            if not announced:
                _say(f"waiting (at most {self.timeout:.0f} s) for {holder}, which is compiling the kernels")
                announced = True
            time.sleep(self.poll)

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "another process"

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays, so that every process locks the same one
            self.fd, self.exclusive = None, False


def _clear_torch_lock(folder: Path, exclusive: bool, deadline: float, timeout: float, poll: float) -> None:
    """Waits (until ``deadline``) until torch's lock file in ``folder`` may go, and removes it when stale."""
    lock = folder / TORCH_LOCK_FILE
    announced = False
    while lock.exists():
        if exclusive:
            # We hold the folder: no ddrs_ext import is compiling here, but the compiler a killed one
            # started may still run (SIGKILL does not reach children); two at once would clobber files.
            running = _build_processes(folder)
            if not running:
                lock.unlink(missing_ok=True)
                _say(f"removed {lock}, left behind by a compile that was interrupted")
                return
            more = f" and {len(running) - 2} more" if len(running) > 3 else ""
            shown = ", ".join(running[:2] if more else running)
            what = f"{shown}{more} still running in {folder}, started by an interrupted compile"
            remedy = f"stop {'them' if len(running) > 1 else 'it'}, then import again"
        else:
            what = f"{lock} to go away (another process is compiling, or an interrupted compile left it)"
            remedy = f"if no other process is compiling ddrs_ext, delete {lock} and import again"
        if time.monotonic() >= deadline:
            raise ImportError(f"ddrs_ext: gave up after {timeout:.0f} s waiting for {what}: {remedy}")
        if not announced:
            _say(f"waiting (at most {timeout:.0f} s) for {what}")
            announced = True
        time.sleep(poll)


def build_locked(folder: Path, build: Callable[[], None], *, timeout: float, poll: float = 0.2) -> None:
    """Runs ``build`` while no other process compiles in ``folder``; waits ``timeout`` seconds at most.

    Takes ``folder/ddrs_ext.lock`` (an flock: the OS releases it when its holder dies), then removes a
    torch ``lock`` file that a killed compile left in ``folder`` once none of its compilers still run
    there. Raises ImportError, naming the process or file in the way, when the wait runs out.
    """
    deadline = time.monotonic() + timeout
    with _FolderLock(folder / LOCK_FILE, deadline, timeout, poll) as lock:
        _clear_torch_lock(folder, lock.exclusive, deadline, timeout, poll)
        build()


def _cuda_toolkit_found() -> bool:
    from torch.utils import cpp_extension  # logs "No CUDA runtime is found" where there is no GPU

    return cpp_extension.CUDA_HOME is not None


def _build_plan() -> tuple[Path, list[Path], bool, Path]:
    """(source folder, sources to compile, with CUDA, cache folder for this build)."""
    src = _source_dir()
    sources = [src / "ops.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    with_cuda = torch.cuda.is_available() and _cuda_toolkit_found()
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
    return src, sources, with_cuda, _cache_root() / f"{tag}-{digest.hexdigest()[:16]}"


def _stamp(library: Path) -> str:
    stat = library.stat()
    return f"{library}\n{stat.st_size}\n{stat.st_mtime_ns}\n"


def _load_built(build_dir: Path) -> bool:
    """Loads the library of a complete earlier build in ``build_dir``, if there is one unchanged since."""
    try:
        stamp = (build_dir / BUILT_FILE).read_text()
        library = Path(stamp.split("\n", 1)[0])
        if stamp != _stamp(library):
            return False
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):  # none, or damaged: build (again)
        return False
    return True


def _jit_build(reason: str, *, source_tree: bool = False) -> None:
    src, sources, with_cuda, build_dir = _build_plan()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImportError(
            f"ddrs_ext: cannot create the kernel cache {build_dir} ({exc}); "
            "set DDRS_EXT_CACHE to a writable folder"
        ) from exc

    def build() -> None:
        # A warm cache loads without torch's cpp_extension (whose import logs a CUDA warning on
        # machines without a GPU) and without running ninja.
        if _load_built(build_dir):
            return
        (build_dir / BUILT_FILE).unlink(missing_ok=True)
        from torch.utils import cpp_extension

        if not any(build_dir.glob("ddrs_ext_C*.so")):
            elsewhere = installed_elsewhere() if source_tree else None
            if elsewhere is not None:
                _say(
                    f"importing {_PACKAGE_DIR}, which has no compiled kernels, instead of the installed "
                    f"build in {elsewhere} (Python looks in the current folder first: run from elsewhere "
                    "to use the installed build)"
                )
            _say(
                f"compiling the C++{'/CUDA' if with_cuda else ''} kernels ({reason}); "
                f"this happens once and takes about a minute. Cache: {build_dir}"
            )
        cflags = CXX_FLAGS + (["-DDDRS_WITH_CUDA"] if with_cuda else [])
        try:
            library = cpp_extension.load(
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
                "ddrs_ext could not compile its C++ kernels. It needs a C++ compiler (g++ or clang++, "
                "version 10 or newer: torch 2.13 builds extensions as C++20) and the `ninja` package; "
                "install them, or install ddrs_ext with "
                "`pip install --no-build-isolation .` next to an installed torch so they compile at "
                f"install time. The compiler said: {exc}"
            ) from exc
        if isinstance(library, str) and Path(library).is_file():
            (build_dir / BUILT_FILE).write_text(_stamp(Path(library)))

    build_locked(build_dir, build, timeout=_lock_timeout())


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
        prebuilt = _prebuilt_libraries(_PACKAGE_DIR)
        reason = (
            f"the prebuilt library does not load with torch {torch.__version__}: {exc}"
            if prebuilt
            else "this install has no prebuilt kernels"
        )
        _jit_build(reason, source_tree=not prebuilt)
        how_loaded = "jit"
    return how_loaded
