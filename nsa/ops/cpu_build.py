"""Build and load the fused CPU ops: one C++ extension (``cpu_module.cpp``, ``decode_cpu.cpp``,
``attention_cpu.cpp``, ``cpu_vec.h``) compiled at first use by ``torch.utils.cpp_extension``.

Compiled with ``-O3 -march=native`` for the CPU it runs on, into a build folder whose name carries
a fingerprint of that CPU (so a build kept in a shared cache never runs where its instructions are
missing); about 30 s the first time, then loaded from the cache. Without a compiler, or if the
build fails: one warning, :func:`load` returns None and the callers use their torch paths.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

_HERE = Path(__file__).parent
SOURCES = [_HERE / "cpu_module.cpp", _HERE / "decode_cpu.cpp", _HERE / "attention_cpu.cpp"]
HEADERS = [_HERE / "cpu_vec.h"]
_module = None
_tried = False


def _cpu_flags() -> tuple[list[str], str]:
    """Compiler flags for this CPU and a name for the build that differs between CPU kinds, so a
    ``-march=native`` build kept in a shared cache folder never runs on a CPU that lacks its instructions."""
    machine = platform.machine().lower()
    if platform.system() != "Linux" or machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        return [], machine
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [], machine
    fields = ("model name", "flags", "Features", "CPU part")
    keep = sorted({ln for ln in info.splitlines() if ln.split(":")[0].strip() in fields})
    return ["-march=native"], machine + "_" + hashlib.sha1("\n".join(keep).encode()).hexdigest()[:10]


def compile_module(name: str, src: Path = _HERE):
    """The op's sources as found in ``src`` (this folder's file names; another commit's copy for an
    A / B, bench/ab_inproc.py) compiled with the op's flags into extension ``name``."""
    from torch.utils import cpp_extension

    env_path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the ninja pip package, when its bin/ is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + env_path
        except ImportError:
            pass
    try:
        arch, _ = _cpu_flags()
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:  # left by a killed build: torch
            lock.unlink(missing_ok=True)  # would wait on it forever
        # the headers' hash among the flags: torch re-versions a build when its sources or flags change
        headers = hashlib.sha1(b"".join((src / h.name).read_bytes() for h in HEADERS)).hexdigest()[:12]
        flags = ["-O3", *arch, "-fopenmp", "-Wno-psabi", f"-DNSA_HEADERS_SHA={headers}"]
        return cpp_extension.load(name, [str(src / s.name) for s in SOURCES], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], extra_include_paths=[str(src)], verbose=False)
    finally:
        os.environ["PATH"] = env_path


def _build():
    return compile_module(f"nsa_cpu_{_cpu_flags()[1]}")


def load():
    """The compiled module, or None (after one warning) when it cannot be built."""
    global _module, _tried
    if not _tried:
        _tried = True
        try:
            _module = _build()
        except Exception as e:  # no compiler, no ninja, a build error: fall back to the torch paths
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(f"nsa: fused CPU kernels unavailable, using the torch paths "
                          f"({type(e).__name__}: {msg[:200]})", RuntimeWarning, stacklevel=2)
    return _module


def require():
    """The compiled module; RuntimeError if it is not available."""
    mod = load()
    if mod is None:
        raise RuntimeError("nsa: the fused CPU kernels are not available")
    return mod
