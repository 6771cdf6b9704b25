"""The small-batch linear kernel (engines.small_linear): the same products as F.linear, built once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from engines import small_linear

needs_kernel = pytest.mark.skipif(not small_linear.available(), reason="no small-batch linear kernel here")
needs_avx512 = pytest.mark.skipif(not small_linear.wide_available(), reason="no AVX-512 on this CPU")
PATHS = [False, pytest.param(True, marks=needs_avx512)]  # AVX2, AVX-512


@pytest.fixture(params=PATHS, ids=["avx2", "avx512"])
def path(request, monkeypatch):
    """Each of the kernel's paths this CPU runs: the AVX2 one everywhere, the AVX-512 one where it has it."""
    monkeypatch.setattr(small_linear, "WIDE", request.param)
    assert small_linear.wide() is request.param
    return request.param


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("out_features, in_features", [(5, 7), (577, 131), (1536, 576), (96, 1536), (3, 16), (33, 48)])
def test_matches_f_linear(rows, out_features, in_features, path):
    torch.manual_seed(rows)
    x = torch.randn(rows, in_features)
    weight = torch.randn(out_features, in_features)
    got = small_linear.linear(x, weight)
    assert got.shape == (rows, out_features)
    assert torch.allclose(got, functional.linear(x, weight), rtol=1e-5, atol=1e-4)


@needs_kernel
@needs_avx512
def test_the_avx512_path_is_opt_in(monkeypatch):
    torch.manual_seed(0)
    x, weight = torch.randn(8, 576), torch.randn(1536, 576)
    assert not small_linear.WIDE and not small_linear.wide()  # the default: the numbers every figure had
    narrow = small_linear.linear(x, weight)
    monkeypatch.setattr(small_linear, "WIDE", True)
    wide = small_linear.linear(x, weight)
    # two summation orders: close, and not the same bits (so the switch does pick another path)
    assert torch.allclose(wide, narrow, rtol=1e-5, atol=1e-4) and not torch.equal(wide, narrow)


@needs_kernel
def test_batched_input_strided_rows_and_bias(path):
    torch.manual_seed(0)
    wide = torch.randn(2, 3, 2 * 200)
    x = wide[..., :200]  # rows 400 floats apart
    weight, bias = torch.randn(90, 200), torch.randn(90)
    got = small_linear.linear(x, weight, bias)
    assert got.shape == (2, 3, 90)
    assert torch.allclose(got, functional.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_the_same_on_one_thread_or_two(path):
    torch.manual_seed(0)
    x, weight = torch.randn(8, 576), torch.randn(1536, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = small_linear.linear(x, weight)
        torch.set_num_threads(2)
        two = small_linear.linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # every output is one row's sum, whichever thread runs it


@needs_kernel
def test_declines_what_it_does_not_cover():
    weight = torch.randn(16, 8)
    assert small_linear.linear(torch.randn(small_linear.ROWS + 1, 8), weight) is None  # a GEMM's job
    assert small_linear.linear(torch.randn(2, 8, dtype=torch.float64), weight.double()) is None
    assert small_linear.linear(torch.randn(2, 8), torch.randn(8, 16).t()) is None  # not contiguous
    assert small_linear.linear(torch.randn(2, 8, requires_grad=True), weight) is None  # autograd's
    with torch.no_grad():
        assert small_linear.linear(torch.randn(2, 8, requires_grad=True), weight) is not None


@needs_kernel
def test_switched_off(monkeypatch):
    monkeypatch.setattr(small_linear, "ENABLED", False)
    assert not small_linear.available()
    assert small_linear.linear(torch.randn(2, 8), torch.randn(4, 8)) is None


def test_the_environment_switch_is_read_at_start():
    code = "from engines import small_linear; print(small_linear.ENABLED, small_linear.available())"
    environment = {**os.environ, "SKILLFOLD_SMALL_LINEAR": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr
    wide = ("from engines import small_linear; "
            "print(small_linear.ENABLED, small_linear.WIDE, small_linear.wide() == small_linear.wide_available())")
    done = subprocess.run([sys.executable, "-c", wide], capture_output=True, text=True,
                          env={**os.environ, "SKILLFOLD_SMALL_LINEAR": "avx512"},
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.stdout.split() == ["True", "True", "True"], done.stderr  # on, and on its AVX-512 path where it has one


@needs_kernel
def test_a_non_default_dtype_setting_still_gets_fp32():
    x, weight = torch.randn(3, 16), torch.randn(5, 16)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = small_linear.linear(x, weight)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32 and torch.allclose(got, x @ weight.T, atol=1e-5)


@needs_kernel
def test_built_once_into_the_cache_and_sharing_pytorchs_openmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLFOLD_CACHE", str(tmp_path))
    built = small_linear.build()
    assert built.parent == tmp_path / "kernels" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert small_linear.build() == built and built.stat().st_mtime_ns == stamp  # cached: not compiled again
    assert not list(built.parent.glob("*.partial"))
    if os.path.exists("/proc/self/maps") and small_linear.available():
        # the kernel's libgomp.so.1 is the one PyTorch loaded, not a second runtime from the system
        # (other libraries may bring their own under other names, as scikit-learn's wheel does)
        with open("/proc/self/maps") as maps:
            runtimes = {line.split()[-1] for line in maps if line.rstrip().endswith("/libgomp.so.1")}
        assert len(runtimes) <= 1, runtimes


def test_a_failing_compiler_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLFOLD_CACHE", str(tmp_path))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'error: no AVX here' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="no AVX here"):
        small_linear.build(str(fake))
    assert not any((tmp_path / "kernels").iterdir())
    with pytest.raises(RuntimeError, match="no C compiler"):
        monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
        small_linear.build()


@needs_kernel
def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLFOLD_CACHE", str(tmp_path))
    built = small_linear.build()
    built.write_bytes(b"not a shared library")
    library = small_linear._open(built)
    assert hasattr(library, "sf_small_linear") and built.read_bytes()[:4] == b"\x7fELF"
