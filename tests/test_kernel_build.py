"""How the fused kernel is built, cached and given up on (model/fused.py), in fresh processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tgastream.model import fused

PROBE = ("from tgastream.model import fused\n"
         "print([fused.available() for _ in range(3)], fused.status().library)\n")


def _python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "TGA_KERNEL_CACHE": str(cache), **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_without_a_compiler_the_reference_path_is_used_and_said_once_with_the_reason(tmp_path: Path):
    res = _python(PROBE, tmp_path, CC="/bin/false")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[False, False, False] None"
    warnings = [ln for ln in res.stderr.splitlines() if "fused TGA kernel unavailable" in ln]
    assert len(warnings) == 1 and "compiling it with /bin/false failed" in warnings[0], res.stderr


@pytest.mark.skipif(not shutil.which("gcc") and not shutil.which("cc"), reason="no C compiler")
def test_a_cached_kernel_loads_without_a_compiler_and_is_portable_by_default(tmp_path: Path):
    built = _python(PROBE, tmp_path)
    assert built.stdout.startswith("[True, True, True]"), built.stderr
    (lib,) = tmp_path.glob("tga_attention-portable-*.so")
    reused = _python(PROBE, tmp_path, CC="/bin/false")  # an image's runtime stage: no compiler, cached library
    assert reused.stdout.strip() == f"[True, True, True] {lib}", reused.stderr
    assert "-march=native" not in fused.compile_flags("portable")


def test_native_builds_are_keyed_by_the_cpu_and_never_share_the_portable_library():
    assert "-march=native" in fused.compile_flags("native")
    assert fused.library_path("native") != fused.library_path("portable")
    assert fused.library_path("native").name.startswith("tga_attention-native-")


def test_a_bad_kernel_target_is_reported_as_the_reason_not_raised(tmp_path: Path):
    res = _python(PROBE, tmp_path, TGA_KERNEL_MARCH="fastest")
    assert res.returncode == 0 and res.stdout.startswith("[False"), res.stderr
    assert "TGA_KERNEL_MARCH must be portable or native, got 'fastest'" in res.stderr
