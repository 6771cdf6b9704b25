"""x Wᵀ for the few rows of a decode step, from a plain fp32 weight, by a small C kernel.

A batch-8 decode step reads every weight of the model once and does at most 8 multiply-adds with
each: its speed is how fast the weights stream from memory. On the 2-core AVX2 machine measured
(AMD EPYC, 26 GB/s for a plain sum over 512 MiB), oneDNN's packed kernel reads SmolLM2's 210 layer
weights in a batch-8 step at 9-10 GB/s (41-46 ms) and MKL's `F.linear` at 5 GB/s;
`csrc/small_linear.c` (one weight row against 8 input rows in registers, a software prefetch ahead
of the weight stream, rows split over PyTorch's own OpenMP threads) at 13-14 GB/s (30-32 ms), and
20 GB/s for 1-4 rows (`benchmarks/bench_linear.py`, docs/benchmarks.md). Where the CPU has AVX-512
the kernel has a second path (16 floats a load, two weight rows at a time): on the 2-core Xeon
measured (AVX-512, AMX) 1.13-1.27x its AVX2 path for 1-8 rows, a fold step 4% shorter. It is opt-in
(`SKILLFOLD_SMALL_LINEAR=avx512` when the process starts, or `WIDE = True`): the kernel's sums run in
another order than oneDNN's or MKL's (~1e-6 relative), and the two paths' orders differ too, which alone
sent `make demo`'s fold elsewhere (its retention check failed where the AVX2 path's passes;
docs/benchmarks.md), so the default keeps the numbers every figure was measured with.

The kernel is compiled once per machine with the system's C compiler (`$CC`, else `cc` or `gcc`;
`-O3 -mavx2 -mfma -fopenmp`) into `$SKILLFOLD_CACHE/kernels/` (default `~/.cache/skillfold/`),
written under a temporary name and renamed, so a killed build leaves nothing half-written. Where it
cannot run (not x86-64, no AVX2 and FMA, no compiler, a failed build) or the process starts with
`SKILLFOLD_SMALL_LINEAR=0` (or sets `ENABLED = False`), `linear` returns None and callers multiply
as before; a failed build is logged once, with the compiler's message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from engines.models import cache_root

log = logging.getLogger(__name__)

ROWS = 8  # at most this many rows (a decode batch) go through the kernel; more: a GEMM does better
SOURCE = Path(__file__).parent / "csrc" / "small_linear.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
_SWITCH = "SKILLFOLD_SMALL_LINEAR"

_lock = threading.Lock()
_function = None  # the loaded kernel, once built
_tried = False  # a build was attempted (and the answer is final for this process)


def _switched_off() -> bool:
    value = os.environ.get(_SWITCH)
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


ENABLED = not _switched_off()  # SKILLFOLD_SMALL_LINEAR=0 when the process starts: off (settable at run time)
# the AVX-512 path, where this CPU runs it: opt-in (SKILLFOLD_SMALL_LINEAR=avx512 at start; settable at run time)
WIDE = os.environ.get(_SWITCH, "").strip().lower() == "avx512"
_wide = False  # this CPU runs the AVX-512 path (asked of the built kernel)


@functools.cache
def _cpu_supported() -> bool:
    """x86-64, and a CPU that PyTorch runs at AVX2 or better (AVX2 and FMA)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return capability.upper().startswith(("AVX2", "AVX512"))


def _compiler() -> str | None:
    configured = os.environ.get("CC")
    if configured:
        return shutil.which(configured.split()[0]) and configured
    return shutil.which("cc") or shutil.which("gcc")


def library_path(compiler: str) -> Path:
    """Where the kernel built by `compiler` from the current source is cached."""
    version = subprocess.run([*compiler.split(), "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"small_linear-{digest}.so"


def build(compiler: str | None = None) -> Path:
    """The kernel's shared library, compiled now unless already cached; raises RuntimeError naming
    what failed (no compiler, the compiler's own message)."""
    compiler = compiler or _compiler()
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc) to build engines/csrc/small_linear.c")
    target = library_path(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run([*compiler.split(), *FLAGS, str(SOURCE), "-o", partial],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} with {compiler} failed:\n{done.stderr.strip()}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _open(path: Path) -> ctypes.CDLL:
    """The built library; one that does not load (a damaged cache file) is built again, once."""
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(build()))


def _load():
    """The kernel function, building it on first use; None where it cannot be had."""
    global _function, _tried, _wide
    if _function is not None or _tried or not ENABLED:
        return _function
    with _lock:
        if _tried:
            return _function
        try:
            if _cpu_supported():
                # torch is imported first, so the library's libgomp.so.1 resolves to the OpenMP runtime
                # PyTorch already loaded: one thread pool, not two fighting over the cores
                library = _open(build())
                function = library.sf_small_linear
                function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                     ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                function.restype = None
                library.sf_small_linear_wide.restype = ctypes.c_int
                _wide = bool(library.sf_small_linear_wide())
                _function = function
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as error:  # (a symbol missing)
            log.warning("the small-batch linear kernel is unavailable, decoding uses oneDNN/MKL instead: %s", error)
        _tried = True
    return _function


def available() -> bool:
    """Whether `linear` computes (the kernel is enabled, this CPU runs it, and it is built), building
    it if needed."""
    return ENABLED and _load() is not None


def wide_available() -> bool:
    """Whether this CPU runs the kernel's AVX-512 path (the kernel available, the CPU with AVX-512)."""
    return available() and _wide


def wide() -> bool:
    """Whether `linear` takes the AVX-512 path now (the kernel is available, the CPU has AVX-512, and
    `WIDE` asks for it)."""
    return wide_available() and bool(WIDE)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x Wᵀ (+ b) for x (..., K) of at most `ROWS` rows and a plain weight W (N, K), both fp32 on CPU,
    through the kernel; None when it does not apply (more rows, another dtype or device, a
    non-contiguous weight, a gradient to track, or no kernel here): the caller multiplies instead.
    Called ~200 times a decode step, so it checks cheaply (~15 µs a call in all, the kernel's
    `ctypes` call 3 of them)."""
    function = _function
    if function is None:
        function = _load()
        if function is None:
            return None
    if not ENABLED:
        return None
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if not 0 < rows <= ROWS or x.dtype is not torch.float32 or weight.dtype is not torch.float32:
        return None
    if not (x.is_cpu and weight.is_cpu) or weight.dim() != 2 or weight.shape[1] != features:
        return None
    if not weight.is_contiguous() or ((x.requires_grad or weight.requires_grad) and torch.is_grad_enabled()):
        return None
    if x.is_contiguous():
        source, stride = x, features
    else:
        source = x.reshape(rows, features)
        if source.stride(-1) != 1:
            source = source.contiguous()
        stride = source.stride(0)
    outputs = weight.shape[0]
    out = torch.empty((*x.shape[:-1], outputs), dtype=torch.float32)
    function(source.data_ptr(), rows, stride, weight.data_ptr(), outputs, features, out.data_ptr(),
             torch.get_num_threads(), _wide and bool(WIDE))
    if bias is not None:
        out += bias
    return out
