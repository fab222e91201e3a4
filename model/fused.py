"""Build and call the fused CPU kernel of the TGA neighbor attention (model/kernels/tga_attention.c).

The kernel is plain C with OpenMP, compiled by the system C compiler at first use (about a second)
into a cache directory and called through ctypes, so there is no build step at install time and no
torch headers to compile against. A library already in the cache is loaded without a compiler (an
image builds it once, at image build time). Where it cannot be built or loaded, the layer falls back
to the reference torch implementation and says so once, as a logged warning (:func:`status` gives
the reason, ``tgastream doctor`` prints it).

Two environment variables steer it. They are deliberately not ``TGASTREAM_*``: every such variable
is parsed as a setting and an unknown one stops every command, and where the kernel is cached is a
property of the installation, not of a run:

- ``TGA_KERNEL_CACHE``: the cache directory (default ``$XDG_CACHE_HOME/tgastream/kernels``, i.e.
  ``~/.cache/tgastream/kernels``);
- ``TGA_KERNEL_MARCH``: ``portable`` (default) compiles for the architecture's baseline
  (x86-64-v2 on x86_64, the compiler's default elsewhere), so a library built on one machine
  (an image build, a shared cache) runs on any other of the same architecture; ``native`` adds
  ``-march=native`` (measured here: ~10% faster kernel, a few % of a training step), and its cache
  key includes the CPU's flags, so it is only ever loaded on a CPU like the one that built it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "tga_attention.c"
BASE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
CACHE_ENV = "TGA_KERNEL_CACHE"
MARCH_ENV = "TGA_KERNEL_MARCH"
MARCHES = ("portable", "native")
X86_64_V2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}  # the CPU flags x86-64-v2 requires


class FusedUnavailable(RuntimeError):
    """The fused kernel cannot be built or loaded here; the message says why, in one line."""


@dataclass(frozen=True)
class KernelStatus:
    """Whether the fused kernel runs here, the library it loaded, or why not."""

    available: bool
    library: Path | None = None
    reason: str = ""


def cache_dir() -> Path:
    """Where compiled kernels are kept (``TGA_KERNEL_CACHE``, else the per-user cache)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgastream", "kernels")
    return Path(base)


def _cpu_flags() -> set[str]:
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    return set(line.partition(":")[2].split())


def march() -> str:
    """The requested build target, ``portable`` or ``native`` (``TGA_KERNEL_MARCH``)."""
    value = os.environ.get(MARCH_ENV, "portable").strip().lower() or "portable"
    if value not in MARCHES:
        raise FusedUnavailable(f"{MARCH_ENV} must be portable or native, got {value!r}")
    return value


def compile_flags(target: str) -> list[str]:
    """Compiler flags for ``target``: the architecture's baseline, or this CPU's (``native``)."""
    if target == "native":
        return [*BASE_FLAGS, "-march=native"]
    if platform.machine() in ("x86_64", "AMD64"):
        baseline = "x86-64-v2" if X86_64_V2 <= _cpu_flags() or not _cpu_flags() else "x86-64"
        return [*BASE_FLAGS, f"-march={baseline}", "-mtune=generic"]
    return list(BASE_FLAGS)


def library_path(target: str) -> Path:
    """The cached library for this source, flags and architecture (and CPU, for ``native``)."""
    if not SOURCE.is_file():
        raise FusedUnavailable(f"the kernel source {SOURCE} is missing from the installed package")
    flags = compile_flags(target)
    cpu = " ".join(sorted(_cpu_flags())) if target == "native" else ""
    key = SOURCE.read_bytes() + " ".join(flags).encode() + platform.machine().encode() + cpu.encode()
    return cache_dir() / f"tga_attention-{target}-{hashlib.sha256(key).hexdigest()[:16]}.so"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise FusedUnavailable("no C compiler (gcc/cc on PATH, or CC) to build it")
    return cc


def build(target: str, path: Path) -> None:
    """Compile the kernel into ``path`` (atomically: concurrent builders never see half a file)."""
    cc = _compiler()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    except OSError as exc:
        raise FusedUnavailable(f"cannot write the kernel cache {path.parent}: {exc.strerror}") from None
    os.close(fd)
    try:
        res = subprocess.run([cc, *compile_flags(target), "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
    except OSError as exc:
        os.unlink(tmp)
        raise FusedUnavailable(f"cannot run the C compiler {cc}: {exc.strerror}") from None
    if res.returncode != 0:
        os.unlink(tmp)
        detail = " ".join(res.stderr.split())[:300] or f"exit status {res.returncode}, no output"
        raise FusedUnavailable(f"compiling it with {cc} failed: {detail}")
    os.replace(tmp, path)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The compiled kernel library: from the cache, else built once per source/flags/architecture."""
    target = march()
    path = library_path(target)
    if not path.exists():
        build(target, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise FusedUnavailable(f"loading {path} failed: {exc}") from None
    for name in ("tga_forward_f32", "tga_forward_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    for name in ("tga_backward_f32", "tga_backward_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    return lib


@lru_cache(maxsize=1)
def status() -> KernelStatus:
    """Whether the fused kernel runs here (building it on the first call), decided once per process:
    a failed build is not retried on every forward pass."""
    try:
        lib = load()
    except FusedUnavailable as exc:
        return KernelStatus(False, reason=str(exc))
    return KernelStatus(True, library=Path(lib._name))


@lru_cache(maxsize=1)
def available() -> bool:
    """True when the fused kernel can run here; when it cannot, logs why once (a warning), since
    the reference path it falls back to is several times slower on CPU."""
    st = status()
    if not st.available:
        log.warning("fused TGA kernel unavailable, using the reference torch path: %s", st.reason)
    return st.available


def _suffix(t: torch.Tensor) -> str:
    if t.dtype == torch.float32:
        return "f32"
    if t.dtype == torch.float64:
        return "f64"
    raise TypeError(f"fused TGA attention supports float32/float64, got {t.dtype}")


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class FusedNeighborAttention(torch.autograd.Function):
    """Autograd wrapper: saves only qkv (already alive for the linear's backward) and the
    attention weights [BN, H, 4]; the backward re-reads neighbors instead of storing them."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, nbr: torch.Tensor, etype: torch.Tensor, r_score: torch.Tensor,
                r_msg: torch.Tensor, heads: int, seq_len: int) -> torch.Tensor:
        lib = load()
        qkv, r_score, r_msg = qkv.contiguous(), r_score.contiguous(), r_msg.contiguous()
        bn, d3 = qkv.shape
        d = d3 // 3
        out = torch.empty(bn, d, dtype=qkv.dtype)  # [BN, D]
        attn = torch.empty(bn, heads, 4, dtype=qkv.dtype)  # [BN, H, 4]
        getattr(lib, f"tga_forward_{_suffix(qkv)}")(
            _ptr(qkv), _ptr(nbr), _ptr(etype), _ptr(r_score), _ptr(r_msg), _ptr(out), _ptr(attn),
            bn, d, heads, r_score.shape[0], torch.get_num_threads())
        ctx.save_for_backward(qkv, nbr, etype, r_score, r_msg, attn)
        ctx.heads, ctx.seq_len = heads, seq_len
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, nbr, etype, r_score, r_msg, attn = ctx.saved_tensors
        grad = grad.contiguous()
        bn, d3 = qkv.shape
        dqkv = torch.zeros_like(qkv)
        dr, dr2 = torch.zeros_like(r_score), torch.zeros_like(r_msg)
        getattr(load(), f"tga_backward_{_suffix(qkv)}")(
            _ptr(grad), _ptr(qkv), _ptr(nbr), _ptr(etype), _ptr(r_score), _ptr(r_msg), _ptr(attn),
            _ptr(dqkv), _ptr(dr), _ptr(dr2), bn, ctx.seq_len, d3 // 3, ctx.heads, r_score.shape[0],
            torch.get_num_threads())
        return dqkv, None, None, dr, dr2, None, None
