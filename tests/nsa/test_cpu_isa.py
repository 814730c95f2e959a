"""The fused CPU ops built for another vector width than this CPU's: baseline x86-64 (SSE2, 4 float
lanes and 16 registers in nsa/ops/cpu_vec.h), against the same torch references as
test_attention_cpu.py and test_decode_cpu.py. `make test` runs the build this machine's
-march=native picks (16 lanes with AVX-512, 8 with AVX2); this one covers the 4-lane path laptops
without AVX and some CI machines get. Slow: its own build of the op (~70 s)."""

from __future__ import annotations

import platform

import pytest

from nsa.ops import cpu_build

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86-64 build")]


@pytest.fixture(scope="module")
def sse_op(tmp_path_factory):
    from torch.utils import cpp_extension

    if cpu_build.load() is None:
        pytest.skip("no C++ compiler: the op is not built here")
    m = cpp_extension.load("nsa_cpu_sse_test", [str(s) for s in cpu_build.SOURCES],
                           extra_cflags=["-O3", "-march=x86-64", "-fopenmp", "-Wno-psabi"], extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(cpu_build._HERE)],
                           build_directory=str(tmp_path_factory.mktemp("sse_build")), verbose=False)
    return m


@pytest.fixture
def use_sse(sse_op, monkeypatch):
    monkeypatch.setattr(cpu_build, "_module", sse_op)
    monkeypatch.setattr(cpu_build, "load", lambda: sse_op)


def test_attention_matches_reference(use_sse):
    from tests.nsa import test_attention_cpu as t

    for case in t.CASES:
        t._compare(case)
    for case in t.CASES[1:5] + t.CASES[6:]:
        t._nsa_compare(case)


def test_decode_matches_torch_path(use_sse):
    from tests.nsa import test_decode_cpu as t

    for overrides, branches in t.KERNEL_CASES:
        t.test_kernel_matches_torch_path_step_by_step(overrides, branches)
