"""Build-on-first-use loader of the fused CPU step kernels (``lstm_kernels.cpp``).

The source is plain C++ behind a C ABI (no torch headers), compiled once per machine with the
system's C++ compiler into a per-user cache and loaded with ctypes: a build takes about a second,
where a ``torch.utils.cpp_extension`` build takes about a minute (docs/rnn_speed.md). The cache key
covers the source, the compiler and its flags and the CPU's feature flags (the build uses
``-march=native``), so a changed source or another machine rebuilds instead of loading a stale or
incompatible library.

``library()`` returns the loaded library, or None when it cannot be built (no compiler, a failed
build) or is switched off with ``HYPERNETWORKS_KERNELS=0``; the fused paths then keep to their
PyTorch-op implementation, after ONE warning per process naming the reason.

``sequence_loops()`` returns the library when its whole-sequence loops can run too: they call the
BLAS that torch links (MKL's ``sgemm_``/``dgemm_``, exported by torch's CPU library on the x86-64
wheels) for the per-step products, so a step costs no Python. Where torch links no MKL (or
``HYPERNETWORKS_SEQUENCE_LOOPS=0``) it is None and the fused paths loop over the steps in Python,
calling the same step kernels.

Environment: ``CXX`` (compiler, default ``c++``/``g++``), ``HYPERNETWORKS_CACHE`` (cache folder,
default ``$XDG_CACHE_HOME/hypernetworks`` or ``~/.cache/hypernetworks``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("lstm_kernels.cpp")
ENV_VAR = "HYPERNETWORKS_KERNELS"
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC"]
# x86: full-width AVX-512 where the CPU has it (compilers default to 256-bit vectors there; the step
# kernels measured 5-20% faster with 512); a no-op on CPUs without AVX-512.
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")
ABI_VERSION = 2
LOOPS_ENV_VAR = "HYPERNETWORKS_SEQUENCE_LOOPS"

_lock = threading.Lock()
_state: dict = {}  # "lib": CDLL | None once tried; "why": reason it is None


def cache_dir() -> Path:
    root = os.environ.get("HYPERNETWORKS_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hypernetworks"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)  # an explicit CXX that does not exist means: no compiler
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / key / "lstm_kernels.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent first uses (test workers, DDP ranks) never
    # see a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    sig = {
        "cell_fwd": [i, i, p, i, p, i, p, i, p, p, p, p, d, p, p, p, p, p, i, p, p, p, p, p],
        "cell_bwd": [i, i, p, p, p, p, p, p, p, p, p, p, p, p, p, p, p, i, p, p, p, p, p],
        "hyper_pre_fwd": [i, i, i, p, i, p, p, p, p, p],
        "hyper_pre_bwd": [i, i, i, p, p, i, p, p, p, p, i, p, p, p, p],
    }
    for name, args in sig.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = args
            fn.restype = None


class Lstm(ctypes.Structure):
    """``struct Lstm`` of lstm_kernels.cpp: one LSTM of the sequence loops."""
    _fields_ = [("S", ctypes.c_int64), ("eps", ctypes.c_double)] + [
        (name, ctypes.c_void_p) for name in ("gw", "gb", "cw", "cb", "mask", "act", "c", "gx", "grstd", "cmean",
                                             "crstd", "tc", "g_gw", "g_gb", "g_cw", "g_cb")]


class HyperSeq(ctypes.Structure):
    """``struct HyperSeq`` of lstm_kernels.cpp: the HyperLSTM layer's sequence loops."""
    _fields_ = ([(name, ctypes.c_int64) for name in ("T", "B", "H", "Hh", "Nz")]
                + [("batch_sizes", ctypes.c_void_p)]
                + [(name, ctypes.c_void_p) for name in (
                    "xw", "xw_hat", "h0", "w_cat", "w_hat_hh", "z_weight", "zb", "wd", "bias",
                    "out", "hh_all", "z_all", "a_all", "pre", "hpre",
                    "d_out", "d_xw", "d_a", "d_z", "dh", "dc", "dhh", "dch", "dpre", "g_wd", "g_bias")]
                + [("main", Lstm), ("hyp", Lstm)])


class LstmSeq(ctypes.Structure):
    """``struct LstmSeq`` of lstm_kernels.cpp: the LSTM layer's sequence loops."""
    _fields_ = ([("T", ctypes.c_int64), ("B", ctypes.c_int64), ("batch_sizes", ctypes.c_void_p)]
                + [(name, ctypes.c_void_p) for name in ("xw", "h0", "w_hh", "out", "pre", "d_out", "d_xw", "dh", "dc")]
                + [("lstm", Lstm)])


class HyperStep(ctypes.Structure):
    """``struct HyperStep`` of lstm_kernels.cpp: one HyperLSTMCell step (shapes, parameters, work buffer)."""
    _fields_ = ([(name, ctypes.c_int64) for name in ("B", "I", "H", "Hh", "Nz")]
                + [(name, ctypes.c_void_p) for name in ("w_ih", "w_hh", "hw_ih", "hw_hh", "hb", "zw", "zb", "dw", "b0",
                                                        "ws")])


def _torch_blas() -> tuple[int, ...] | None:
    """Addresses of ``sgemm_``, ``dgemm_`` and MKL's packed GEMM (``cblas_sgemm_pack_get_size``,
    ``cblas_sgemm_pack``, ``cblas_sgemm_compute``; None where absent) in torch's CPU library when that
    library carries MKL (whose Fortran-style ``sgemm_``/``dgemm_`` take 32-bit sizes); None otherwise."""
    import torch

    libdir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if not (libdir / name).exists():
            continue
        try:
            lib = ctypes.CDLL(str(libdir / name))
            lib.mkl_get_max_threads  # noqa: B018 -- MKL's LP64 interface, not another BLAS
            gemm = tuple(ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in ("sgemm_", "dgemm_"))
        except (OSError, AttributeError):
            return None
        try:
            packed = tuple(ctypes.cast(getattr(lib, f"cblas_sgemm_{n}"), ctypes.c_void_p).value
                           for n in ("pack_get_size", "pack", "compute"))
        except AttributeError:
            packed = (None, None, None)
        return gemm + packed
    return None


def _declare_loops(lib: ctypes.CDLL) -> bool:
    """Declare the sequence loops and hand them torch's BLAS; False when there is none."""
    blas = _torch_blas()
    if blas is None:
        return False
    lib.hn_set_blas.argtypes = [ctypes.c_void_p] * 5
    lib.hn_set_blas.restype = None
    lib.hn_set_blas(*blas)
    for name, struct in (("hyper_seq", HyperSeq), ("lstm_seq", LstmSeq)):
        for way in ("fwd", "bwd"):
            for suffix in ("f32", "f64"):
                fn = getattr(lib, f"{name}_{way}_{suffix}")
                fn.argtypes = [ctypes.POINTER(struct)]
                fn.restype = None
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.hyper_step_ws_size.argtypes = [i, i, i, i]
    lib.hyper_step_ws_size.restype = i
    for suffix in ("f32", "f64"):
        fwd, bwd = getattr(lib, f"hyper_step_fwd_{suffix}"), getattr(lib, f"hyper_step_bwd_{suffix}")
        fwd.argtypes = [ctypes.POINTER(HyperStep), p, p, p, i, p, i, p, i, p, p]
        bwd.argtypes = [ctypes.POINTER(HyperStep), p, p, p, p, i] + [p] * 12
        fwd.restype = bwd.restype = None
    return True


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(ENV_VAR, "1") in ("0", "false", "False"):
        return None, f"{ENV_VAR}=0"
    cxx = _compiler()
    if cxx is None:
        wanted = os.environ.get("CXX") or "c++/g++/clang++"
        return None, f"no C++ compiler found ({wanted} is not on PATH)"
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
        if lib.hn_kernels_abi_version() != ABI_VERSION:
            return None, "stale kernel library in the cache"
        _declare(lib)
        _state["loops"] = (os.environ.get(LOOPS_ENV_VAR, "1") not in ("0", "false", "False")
                           and _declare_loops(lib))
        return lib, ""
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return None, f"building the kernels failed: {e}"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (after one warning) when unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _load()
                _state["why"] = why
                _state["lib"] = lib
                if lib is None and not why.startswith(ENV_VAR):
                    warnings.warn(f"hypernetworks: fused CPU kernels unavailable ({why}); the LSTM/HyperLSTM "
                                  "layers use the slower PyTorch-op path. Install a C++ compiler (e.g. g++) "
                                  "for full CPU speed.", RuntimeWarning, stacklevel=3)
    return _state["lib"]


def sequence_loops() -> ctypes.CDLL | None:
    """The compiled library when its whole-sequence loops can run (see the module notes), else None."""
    lib = library()
    return lib if lib is not None and _state.get("loops") else None


def ptr(t) -> int | None:
    """Data pointer of a tensor for ctypes (None for None)."""
    return None if t is None else t.data_ptr()
