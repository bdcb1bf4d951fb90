"""The kernel registry: what it lists, what `get` returns, how it fails."""
import importlib
import inspect
import pkgutil

import pytest

import sparx_ref.ref
from sparx_ref import kernels
from sparx_ref.kernels import registry

SCAN_OPS = ("selective_scan_fwd", "selective_scan_bwd", "cross_scan", "cross_merge",
            "ss2d_scan_fwd", "ss2d_scan_bwd")


def _reference_op(op):
    """The function named `op` in sparx_ref.ref (the op every kernel mirrors)."""
    for info in pkgutil.iter_modules(sparx_ref.ref.__path__):
        mod = importlib.import_module(f"sparx_ref.ref.{info.name}")
        fn = getattr(mod, op, None)
        if callable(fn):
            return fn
    return None


def test_registered_lists_every_scan_kernel_for_every_backend():
    pairs = kernels.registered()
    assert len(pairs) == len(set(pairs)), "registered() must not repeat a pair"
    for op in SCAN_OPS:
        for backend in kernels.BACKENDS:
            assert (op, backend) in pairs, f"missing kernel {op} for {backend}"


def test_every_pair_has_exactly_one_default_and_unique_versions():
    for op, backend in kernels.registered():
        rows = kernels.entries(op, backend)
        assert sum(e.default for e in rows) == 1, (op, backend)
        names = [e.version for e in rows]
        assert len(names) == len(set(names)), (op, backend, names)
        assert all(e.backend in kernels.BACKENDS for e in rows)
        assert all(e.idea.strip() for e in rows), f"every version of {op}/{backend} needs its idea"


def test_ladders_exist_where_they_teach():
    for backend in ("numba_cuda", "cupy"):
        assert kernels.versions("selective_scan_fwd", backend)[:2] == ["naive", "warp"]
        for op in ("cross_scan", "cross_merge"):
            assert {"naive", "tiled"} <= set(kernels.versions(op, backend))
            # Numba's default: the tiles with unsigned indices (no negative-index fix-ups)
            want = "tiled" if backend == "cupy" else "tiled_unsigned"
            assert [e.version for e in kernels.entries(op, backend) if e.default] == [want]
        assert {"composed", "fused", "quad"} <= set(kernels.versions("ss2d_scan_fwd", backend))
        # the defaults are the fastest measured on a GPU (benchmarks/RESULTS.md)
        assert [e.version for e in kernels.entries("ss2d_scan_fwd", backend) if e.default] == ["quad"]
        for op in ("selective_scan_fwd", "selective_scan_bwd"):
            assert [e.version for e in kernels.entries(op, backend) if e.default] == ["vec"]
        for op in ("dmca_attention_fwd", "dmca_attention_bwd"):
            want = "tiled" if backend == "cupy" else "tiled_staged"
            assert [e.version for e in kernels.entries(op, backend) if e.default] == [want]


def test_get_returns_the_default_and_named_versions():
    fn = kernels.get("selective_scan_fwd", "numba_cpu")
    assert fn.__module__ == "sparx_ref.kernels.numba_cpu.scan" and fn.__name__ == "selective_scan_fwd"
    assert kernels.get("cross_scan", "numba_cpu", "rowwise") is fn.__globals__["cross_scan"]


def test_get_unknown_op_backend_or_version_is_a_keyerror_listing_what_exists():
    with pytest.raises(KeyError, match="registered"):
        kernels.get("no_such_op", "numba_cpu")
    with pytest.raises(KeyError, match="versions"):
        kernels.get("selective_scan_fwd", "numba_cpu", "no_such_version")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.runtime_missing("opencl")


def test_missing_runtime_raises_kernel_unavailable_naming_it(monkeypatch):
    monkeypatch.setattr(registry, "runtime_missing",
                        lambda backend: f"backend {backend!r} needs CuPy: pip install cupy-cuda13x")
    with pytest.raises(kernels.KernelUnavailable, match="needs CuPy"):
        kernels.get("selective_scan_fwd", "cupy")


def test_cupy_without_gpu_is_unavailable_with_a_reason():
    missing = kernels.runtime_missing("cupy")
    if missing is None:
        pytest.skip("a GPU is present: CuPy is available")
    assert "cupy" in missing.lower() or "gpu" in missing.lower()
    with pytest.raises(kernels.KernelUnavailable):
        kernels.get("cross_scan", "cupy")


def _importable_rows():
    out = []
    for e in kernels.entries():
        if e.backend == "cupy" or (e.backend == "numba_cuda" and kernels.runtime_missing("numba_cuda")):
            continue   # needs a GPU (or the simulator) to import usefully; compile_checks covers cupy
        out.append(pytest.param(e, id=f"{e.op}-{e.backend}-{e.version}"))
    return out


@pytest.mark.parametrize("entry", _importable_rows())
def test_every_target_exists_and_mirrors_the_reference_signature(entry):
    module, attr = entry.target.split(":")
    fn = getattr(importlib.import_module(module), attr)
    ref = _reference_op(entry.op)
    assert ref is not None, f"no reference op {entry.op} in sparx_ref.ref"
    got = list(inspect.signature(fn).parameters.items())
    want = list(inspect.signature(ref).parameters.items())
    assert [(n, p.default) for n, p in got] == [(n, p.default) for n, p in want], entry.target


def test_cupy_targets_exist_in_the_source_without_importing_cupy():
    # the cupy module imports cupy lazily, so it imports on any machine
    for e in (e for op in SCAN_OPS for e in kernels.entries(op, "cupy")):
        module, attr = e.target.split(":")
        fn = getattr(importlib.import_module(module), attr)
        ref = _reference_op(e.op)
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(ref).parameters)
