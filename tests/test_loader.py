"""The compile at first import (ddrs_ext._loader): it cannot hang on a killed compile, every wait is
bounded and says what it waits for, and tests import the installed package.

The locking is tested with fake builds (and one tiny real torch compile); the real ~80 s compile of the
kernels is not repeated here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ddrs_ext
from ddrs_ext import _loader

HAS_PROC = Path("/proc/self/cwd").exists()


@pytest.fixture
def folder(tmp_path) -> Path:
    build = tmp_path / "build"
    build.mkdir()
    return build


def torch_lock(folder: Path) -> Path:
    return folder / _loader.TORCH_LOCK_FILE


class Build:
    """A fake build that records, each time it runs, whether torch's lock file was there."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.saw_torch_lock = folder, []

    def __call__(self) -> None:
        self.saw_torch_lock.append(torch_lock(self.folder).exists())


def never() -> None:
    raise AssertionError("the build ran although the folder was not free")


def test_stale_torch_lock_is_removed(folder, capsys):
    torch_lock(folder).touch()  # what a compile killed inside torch's FileBaton leaves
    build = Build(folder)
    _loader.build_locked(folder, build, timeout=5)
    assert build.saw_torch_lock == [False]
    err = capsys.readouterr().err
    assert f"ddrs_ext: removed {torch_lock(folder)}, left behind by a compile that was interrupted" in err
    assert (folder / _loader.LOCK_FILE).read_text().startswith(f"process {os.getpid()} on ")
    # Nothing stale: nothing said, and the lock is free again for the next build.
    _loader.build_locked(folder, build, timeout=5)
    assert build.saw_torch_lock == [False, False] and capsys.readouterr().err == ""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_real_torch_compile_waits_on_a_stale_lock_unless_build_locked(folder, monkeypatch):
    """torch.utils.cpp_extension.load itself waits on the `lock` file this module removes."""
    from torch.utils import cpp_extension, file_baton

    source = folder / "tiny.cpp"
    source.write_text('extern "C" int ddrs_tiny() { return 42; }\n')

    def load(name: str) -> None:
        cpp_extension.load(
            name=name, sources=[str(source)], build_directory=str(folder), is_python_module=False
        )

    def wait(baton):
        raise TimeoutError(f"torch waits for {baton.lock_file_path}")

    monkeypatch.setattr(file_baton.FileBaton, "wait", wait)  # instead of waiting forever
    torch_lock(folder).touch()
    with pytest.raises(TimeoutError, match=f"torch waits for {torch_lock(folder)}"):
        load("ddrs_tiny_plain")
    _loader.build_locked(folder, lambda: load("ddrs_tiny_locked"), timeout=60)
    assert any(folder.glob("ddrs_tiny_locked*.so")) and not torch_lock(folder).exists()


def hold_in_thread(folder: Path):
    """Holds the folder's lock in a thread (flock locks of two open() calls exclude each other)."""
    started, release = threading.Event(), threading.Event()

    def build() -> None:
        started.set()
        release.wait(60)

    thread = threading.Thread(target=_loader.build_locked, args=(folder, build), kwargs={"timeout": 5})
    thread.start()
    assert started.wait(10)
    return thread, release


def test_waits_for_a_live_holder_then_builds(folder, capsys):
    thread, release = hold_in_thread(folder)
    threading.Timer(0.5, release.set).start()
    order = []
    _loader.build_locked(folder, lambda: order.append(release.is_set()), timeout=30, poll=0.05)
    thread.join()
    assert order == [True]  # it ran only after the holder had finished
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"ddrs_ext: waiting (at most 30 s) for process {os.getpid()} on ")
    assert err.endswith("which is compiling the kernels\n")


def test_gives_up_on_a_live_holder_naming_it(folder):
    thread, release = hold_in_thread(folder)
    try:
        with pytest.raises(ImportError) as error:
            _loader.build_locked(folder, never, timeout=1, poll=0.05)
    finally:
        release.set()
        thread.join()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"ddrs_ext: gave up after 1 s waiting for process {os.getpid()} on ")
    assert f"which holds {folder / _loader.LOCK_FILE} while it compiles the kernels" in message
    assert "DDRS_EXT_LOCK_TIMEOUT" in message


def test_a_holder_killed_mid_compile_does_not_block(folder, outside_checkout, capsys):
    """A process killed (SIGKILL) inside torch's compile: its flock goes with it, torch's lock stays."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ddrs_ext import _loader\n"
        "folder = Path(sys.argv[1])\n"
        "def build():\n"
        "    (folder / _loader.TORCH_LOCK_FILE).touch()  # as torch's FileBaton does\n"
        "    print('compiling', flush=True)\n"
        "    time.sleep(600)\n"
        "_loader.build_locked(folder, build, timeout=60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=outside_checkout.cwd,
        env=outside_checkout.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line == "compiling\n", proc.kill() or proc.communicate()[1]
        with pytest.raises(ImportError, match=f"waiting for process {proc.pid} on "):
            _loader.build_locked(folder, never, timeout=0.3, poll=0.05)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL and torch_lock(folder).exists()
    capsys.readouterr()
    build = Build(folder)
    _loader.build_locked(folder, build, timeout=10)
    assert build.saw_torch_lock == [False]
    assert "removed" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_PROC, reason="finds running compilers through /proc")
def test_waits_for_a_compiler_that_a_killed_compile_left_running(folder, capsys):
    """SIGKILL does not reach the ninja a killed import started: the torch lock stays until it ends."""
    ninja = shutil.which("ninja") or str(Path(sys.executable).with_name("ninja"))
    (folder / "build.ninja").write_text("rule wait\n  command = sleep 3\nbuild out: wait\n")
    torch_lock(folder).touch()
    proc = subprocess.Popen([ninja], cwd=folder, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not _loader._build_processes(folder) and time.monotonic() < deadline:
            time.sleep(0.02)
        running = f"pid {proc.pid} (ninja)"  # and, with some ninja packages, the real ninja it started
        assert running in _loader._build_processes(folder)
        with pytest.raises(ImportError) as error:
            _loader.build_locked(folder, never, timeout=0.2, poll=0.05)
        message = str(error.value)
        assert message.startswith(f"ddrs_ext: gave up after 0 s waiting for {running}")
        tail = r"still running in .*, started by an interrupted compile: stop (it|them), then import again"
        assert f"still running in {folder}," in message and re.search(tail + "$", message)
        assert torch_lock(folder).exists()
        capsys.readouterr()
        order = []
        _loader.build_locked(
            folder, lambda: order.append((torch_lock(folder).exists(), proc.poll())), timeout=60, poll=0.05
        )
        assert order == [(False, 0)]  # ninja had finished, then the lock went, then the build ran
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"ddrs_ext: waiting (at most 60 s) for {running}")
        assert err[1].startswith(f"ddrs_ext: removed {torch_lock(folder)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_without_flock_a_torch_lock_is_waited_on_with_a_limit(folder, monkeypatch):
    monkeypatch.setattr(_loader, "fcntl", None)  # as on a file system without flock
    torch_lock(folder).touch()
    with pytest.raises(ImportError) as error:
        _loader.build_locked(folder, never, timeout=0.2, poll=0.05)
    assert f"delete {torch_lock(folder)} and import again" in str(error.value)
    threading.Timer(0.3, torch_lock(folder).unlink).start()  # another process's compile ends
    build = Build(folder)
    _loader.build_locked(folder, build, timeout=30, poll=0.05)
    assert build.saw_torch_lock == [False]


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_bad_lock_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv("DDRS_EXT_LOCK_TIMEOUT", value)
    with pytest.raises(
        ImportError, match=f"DDRS_EXT_LOCK_TIMEOUT must be a number of seconds > 0, got '{value}'"
    ):
        _loader._lock_timeout()


def test_lock_timeout_default_and_setting(monkeypatch):
    monkeypatch.delenv("DDRS_EXT_LOCK_TIMEOUT", raising=False)
    assert _loader._lock_timeout() == _loader.DEFAULT_LOCK_TIMEOUT_S
    monkeypatch.setenv("DDRS_EXT_LOCK_TIMEOUT", "90")
    assert _loader._lock_timeout() == 90.0


@pytest.mark.parametrize("cached", [False, True])
def test_jit_build_clears_a_stale_lock_and_names_the_installed_copy(tmp_path, monkeypatch, capsys, cached):
    """The import path end to end, with torch's compile replaced by a fake (the real one takes a minute)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("DDRS_EXT_CACHE", str(tmp_path / "cache"))
    build_dir = _loader._build_plan()[3]
    assert build_dir.parent == tmp_path / "cache"
    build_dir.mkdir(parents=True)
    torch_lock(build_dir).touch()
    if cached:
        (build_dir / "ddrs_ext_C.so").touch()
    installed = tmp_path / "site-packages" / "ddrs_ext"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").touch()
    monkeypatch.setattr(sys, "path", [*sys.path, str(installed.parent)])
    calls = []
    monkeypatch.setattr(
        cpp_extension,
        "load",
        lambda **kw: calls.append((kw["build_directory"], torch_lock(build_dir).exists())),
    )
    _loader._jit_build("a test", source_tree=True)
    assert calls == [(str(build_dir), False)]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"ddrs_ext: removed {torch_lock(build_dir)}")
    if cached:  # nothing to compile: nothing more to say
        assert len(err) == 1
    else:
        assert err[1] == (
            f"ddrs_ext: importing {Path(_loader.__file__).resolve().parent}, which has no compiled kernels, "
            f"instead of the installed build in {installed} (Python looks in the current folder first: "
            "run from elsewhere to use the installed build)"
        )
        assert err[2].startswith("ddrs_ext: compiling the C++ kernels (a test); this happens once")
        assert len(err) == 3
    # Without the source-tree flag (DDRS_EXT_JIT=1, or a prebuilt library that no longer loads): no such line.
    (build_dir / "ddrs_ext_C.so").unlink(missing_ok=True)
    _loader._jit_build("a test")
    assert "installed build" not in capsys.readouterr().err


def test_a_complete_build_loads_again_without_torch_compile(tmp_path, monkeypatch, capsys):
    """A warm cache loads its library directly: no ninja run, no cpp_extension import (whose CUDA
    warning would show on every import); a library changed since, or a failed build, builds again."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("DDRS_EXT_CACHE", str(tmp_path / "cache"))
    library = _loader._build_plan()[3] / "ddrs_ext_C.so"
    builds, loads = [], []

    def compile_and_load(**kw):
        builds.append(kw["build_directory"])
        library.write_bytes(b"library %d" % len(builds))
        return str(library)

    def fail(**kw):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", compile_and_load)
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    _loader._jit_build("a test")
    assert len(builds) == 1 and loads == []  # cpp_extension.load loads what it builds
    assert "compiling" in capsys.readouterr().err
    _loader._jit_build("a test")
    assert len(builds) == 1 and loads == [str(library)]
    assert capsys.readouterr().err == ""
    library.write_bytes(b"rewritten by a compile that did not finish")
    _loader._jit_build("a test")
    assert len(builds) == 2 and loads == [str(library)]
    monkeypatch.setattr(cpp_extension, "load", fail)
    library.write_bytes(b"changed again")
    with pytest.raises(
        ImportError, match=r"clang\+\+, version 10 or newer.* `ninja` package.* Ninja is required"
    ):
        _loader._jit_build("a test")
    assert not (library.parent / _loader.BUILT_FILE).exists()  # a failed build is not taken as complete
    assert not torch_lock(library.parent).exists()  # and the folder is free for the next try
    _loader.build_locked(library.parent, Build(library.parent), timeout=1)


def test_a_python_outside_the_checkout_imports_the_tests_ddrs_ext(outside_checkout):
    """Subprocesses in the tests (outside_checkout) use the package under test, ready, compiling nothing."""
    run = outside_checkout.python(
        "import ddrs_ext; from ddrs_ext import _loader; print(ddrs_ext.__file__); print(_loader.how_loaded)"
    )
    assert run.returncode == 0, run.stderr
    where, how = run.stdout.split()
    assert where == ddrs_ext.__file__, (
        f"the tests import {ddrs_ext.__file__} but a Python started outside the checkout imports {where}: "
        "run the tests with `pytest tests` (`python -m pytest` puts the checkout's source tree first)"
    )
    assert how == _loader.how_loaded
    assert "compiling" not in run.stderr
