"""Build and call the fused CPU kernel of the TGA neighbor attention (model/kernels/tga_attention.c).

The kernel is plain C with OpenMP, compiled by the system C compiler at first use (about a second)
into a per-user cache directory and called through ctypes, so there is no build step at install
time and no torch headers to compile against. Where no compiler is found the layer falls back to
the reference torch implementation (:func:`available` says which one runs).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "tga_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


class FusedUnavailable(RuntimeError):
    """The fused kernel cannot be built here (no C compiler, or the build failed)."""


def cache_dir() -> Path:
    base = os.environ.get("TGASTREAM_KERNEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgastream", "kernels")
    return Path(base)


def _cpu_tag() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The compiled kernel library (built once per source/CPU, then cached on disk)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise FusedUnavailable("no C compiler (gcc/cc) on PATH")
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu_tag().encode()).hexdigest()[:16]
    target = cache_dir() / f"tga_attention-{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            raise FusedUnavailable(f"building the fused kernel failed: {res.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: concurrent builders never see a half-written library
    lib = ctypes.CDLL(str(target))
    for name in ("tga_forward_f32", "tga_forward_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    for name in ("tga_backward_f32", "tga_backward_f64"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    return lib


def available() -> bool:
    """True when the fused kernel can run here (it is built on the first call)."""
    try:
        load()
        return True
    except (FusedUnavailable, OSError):
        return False


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
