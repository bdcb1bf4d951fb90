"""The kernel registry: every fast kernel, keyed by (op, backend, version).

A kernel has the same signature, semantics and return convention as the reference op
of the same name in ``sparx_ref.ref`` (``selective_scan_fwd`` mirrors
``sparx_ref.ref.scan.selective_scan_fwd``), with arrays of its backend:

- ``numba_cpu``:  NumPy arrays.
- ``numba_cuda``: CuPy arrays or anything exposing ``__cuda_array_interface__``
  (numba device arrays, torch CUDA tensors); outputs are numba device arrays unless the
  inputs were CuPy arrays (then CuPy).
- ``cupy``:       CuPy arrays (or ``__cuda_array_interface__`` objects).

The table below is static text: listing it imports no runtime, so ``registered()`` works
on a machine without Numba, CuPy or a GPU. ``get`` imports the module on demand and
raises :class:`KernelUnavailable` naming what is missing. Tests enumerate this table, so
a kernel added here is tested by the existing tests automatically.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

BACKENDS = ("numba_cpu", "numba_cuda", "cupy")


class KernelUnavailable(RuntimeError):
    """The kernel exists but its runtime (Numba, CuPy, a GPU) is missing here."""


@dataclass(frozen=True)
class Entry:
    op: str          # reference op name, e.g. "selective_scan_fwd"
    backend: str     # one of BACKENDS
    version: str     # ladder rung, e.g. "naive", "coalesced", "fused"
    target: str      # "module:function"
    default: bool    # the fastest correct version: what get(op, backend) returns
    idea: str = ""   # one-line idea of this version


# ---------------------------------------------------------------------------------------
# The table. One row per (op, backend, version). Exactly one default per (op, backend).
# ---------------------------------------------------------------------------------------
_TABLE: list[Entry] = [
    # --- scan kernels (issue: scan kernels) -------------------------------------------
    *[Entry(op, "numba_cpu", "rowwise", f"sparx_ref.kernels.numba_cpu.scan:{op}", True, idea)
      for op, idea in (
          ("selective_scan_fwd", "one thread walks one (batch, channel) row; rows in parallel; "
                                 "float32 gates computed SIMD-vectorised T steps at a time"),
          ("selective_scan_bwd", "forward states per row, then the adjoint recurrence backwards; "
                                 "a thread owns a (batch, group) so dB/dC need no atomics"),
          ("cross_scan", "one thread per (batch, channel) writes the four reading orders"),
          ("cross_merge", "one thread per (batch, channel) adds the four directions in order"),
          ("ss2d_scan_fwd", "fused: a thread scans the map in all four directions and adds "
                            "into y (no cross-scan copy)"),
          ("ss2d_scan_bwd", "fused: reads x and dy in each direction; per-direction dx planes "
                            "added in a fixed order"))],
    # Defaults are the fastest versions measured (H100, 2026-11-27, benchmarks/RESULTS.md):
    # "vec" beat "warp" at every scan shape on both backends, and the "quad" ss2d forward beat
    # "composed" (the first "fused" rung lost to composed: it stays as a lesson in latency).
    *[row for backend in ("numba_cuda", "cupy") for row in (
        Entry("selective_scan_fwd", backend, "naive",
              f"sparx_ref.kernels.{backend}.scan:selective_scan_fwd_naive", False,
              "one thread per row walking L: neighbouring threads read addresses L apart (uncoalesced)"),
        Entry("selective_scan_fwd", backend, "warp",
              f"sparx_ref.kernels.{backend}.scan:selective_scan_fwd", False,
              "one warp per row, lanes = consecutive steps (coalesced); warp-shuffle scan of "
              "(a, b) pairs per 32 steps, the state carried between chunks"),
        Entry("selective_scan_bwd", backend, "warp",
              f"sparx_ref.kernels.{backend}.scan:selective_scan_bwd", False,
              "recompute the forward per round from stored round-entry states, reverse warp "
              "scan of the adjoint; dB/dC summed over the block's channels in shared memory"),
        Entry("selective_scan_fwd", backend, "vec",
              f"sparx_ref.kernels.{backend}.scan:selective_scan_fwd_vec", True,
              "a lane holds 4 consecutive steps (16-byte loads): one warp scan per 4 elements over "
              "lane aggregates, next round's loads in flight; short rows share a warp"),
        Entry("selective_scan_bwd", backend, "vec",
              f"sparx_ref.kernels.{backend}.scan:selective_scan_bwd_vec", True,
              "the warp backward with 4 consecutive steps per lane (16-byte loads, suffix scan "
              "over lane aggregates); dB/dC summed over the block's rows in shared memory"),
        Entry("cross_scan", backend, "naive", f"sparx_ref.kernels.{backend}.scan:cross_scan_naive",
              False, "one thread per element writes its four copies (transposed ones uncoalesced)"),
        Entry("cross_scan", backend, "tiled",
              f"sparx_ref.kernels.{backend}.scan:{'cross_scan' if backend == 'cupy' else 'cross_scan_tiled'}",
              backend == "cupy", "32x32 tile through shared memory: every read and write coalesced"),
        Entry("cross_merge", backend, "naive", f"sparx_ref.kernels.{backend}.scan:cross_merge_naive",
              False, "one thread per output element reads its four sources"),
        Entry("cross_merge", backend, "tiled",
              f"sparx_ref.kernels.{backend}.scan:{'cross_merge' if backend == 'cupy' else 'cross_merge_tiled'}",
              backend == "cupy", "32x32 tile through shared memory for the transposed directions"),
        Entry("ss2d_scan_fwd", backend, "composed",
              f"sparx_ref.kernels.{backend}.scan:ss2d_scan_fwd_composed", False,
              "cross_scan + selective scan + cross_merge kernels: three passes through memory"),
        Entry("ss2d_scan_fwd", backend, "fused", f"sparx_ref.kernels.{backend}.scan:ss2d_scan_fwd",
              False, "one block per (batch, channel): the map read once into shared memory, four "
                    "directions scanned from there, y written once in a fixed order"),
        Entry("ss2d_scan_fwd", backend, "quad", f"sparx_ref.kernels.{backend}.ss2d:ss2d_scan_fwd_quad",
              True, "a block of 4 warps per (batch, channel), warp k scans direction k from the "
                    "shared map, ITEMS steps per lane; directions merged by two 2-addend shared "
                    "accumulators (deterministic)"),
        Entry("ss2d_scan_bwd", backend, "composed",
              f"sparx_ref.kernels.{backend}.scan:ss2d_scan_bwd_composed", True,
              "cross_scan(dy) + scan backward + cross_merge(du)"),
        Entry("ss2d_scan_bwd", backend, "fused", f"sparx_ref.kernels.{backend}.scan:ss2d_scan_bwd",
              False, "x and dy maps in shared memory, four directions, dx written once; dB/dC by "
                    "atomics over channels"),
    )],
    # Numba only: the tiled cross-scan/merge with unsigned indices. Numba's signed int64 indices
    # get a negative-index wrap-around fix-up at every access (PTX 639 -> 153 instructions).
    Entry("cross_scan", "numba_cuda", "tiled_unsigned", "sparx_ref.kernels.numba_cuda.scan:cross_scan", True,
          "the tiled kernel with unsigned 64-bit indices: no per-access negative-index fix-ups"),
    Entry("cross_merge", "numba_cuda", "tiled_unsigned", "sparx_ref.kernels.numba_cuda.scan:cross_merge", True,
          "the tiled kernel with unsigned 64-bit indices: no per-access negative-index fix-ups"),
    # --- attention kernels (issue: attention kernels) ---------------------------------
    # CuPy's default window kernels are the per-shape "static" ones (fwd+bwd 1.09 ms vs 2.10 ms
    # fused, H200 2026-11-27; NVRTC compiles a shape in well under a second). Numba's default is
    # "static_unsigned" (H200 2026-11-27 04:24: fwd+bwd 1.23 ms vs fused 4.81, static 4.17, CuPy
    # 1.08): the per-shape JIT is paid once per (N, head dim, dtype) and process.
    Entry("window_attention_fwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:window_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element, intermediates in device memory"),
    Entry("window_attention_fwd", "numba_cuda", "fused", "sparx_ref.kernels.numba_cuda.attention:window_attention_fwd_fused", False,
          "one block per (window, head): N x N scores in shared memory, fused bias+mask+softmax+P v, 4x4 register tiles"),
    Entry("window_attention_fwd", "numba_cuda", "static", "sparx_ref.kernels.numba_cuda.attention:window_attention_fwd_static", False,
          "the fused kernel compiled per (N, hd): constant loop bounds unrolled, score tiles in registers"),
    # Numba only: the static kernels with unsigned indices (the DMCA "tiled_unsigned" idea). PTX at
    # Swin-T stage 0 (N 49, hd 32): tile loop 157 -> 57 instructions, kernels 0.45x; 3.4x faster
    # than the signed static rung on the H200.
    Entry("window_attention_fwd", "numba_cuda", "static_unsigned",
          "sparx_ref.kernels.numba_cuda.attention:window_attention_fwd_static_unsigned", True,
          "the static kernel with unsigned 64-bit indices: no per-access negative-index fix-ups"),
    Entry("window_attention_bwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:window_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element, dS through device memory, dbias by a column sum"),
    Entry("window_attention_bwd", "numba_cuda", "fused", "sparx_ref.kernels.numba_cuda.attention:window_attention_bwd_fused", False,
          "one block per (head, window set): P and dS in shared memory, dbias in per-block slabs (no atomics)"),
    Entry("window_attention_bwd", "numba_cuda", "static", "sparx_ref.kernels.numba_cuda.attention:window_attention_bwd_static", False,
          "the fused backward compiled per (N, hd): unrolled, bias-gradient shares in registers across windows"),
    Entry("window_attention_bwd", "numba_cuda", "static_unsigned",
          "sparx_ref.kernels.numba_cuda.attention:window_attention_bwd_static_unsigned", True,
          "the static backward with unsigned 64-bit indices: no per-access negative-index fix-ups"),
    Entry("dmca_attention_fwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element"),
    Entry("dmca_attention_fwd", "numba_cuda", "tiled", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_fwd_tiled", False,
          "shared-memory tiled GEMMs (64x64 tile, 4x4 per thread), coalesced along the contiguous axis"),
    # Numba only: the tiled DMCA kernels with unsigned indices (the cross_scan "tiled_unsigned" idea),
    # then their softmax rows staged through shared memory (CuPy's "tiled" reads a row per warp).
    Entry("dmca_attention_fwd", "numba_cuda", "tiled_unsigned",
          "sparx_ref.kernels.numba_cuda.attention:dmca_attention_fwd_tiled_unsigned", False,
          "the tiled kernels with unsigned 64-bit indices: no per-access negative-index fix-ups"),
    Entry("dmca_attention_fwd", "numba_cuda", "tiled_staged",
          "sparx_ref.kernels.numba_cuda.attention:dmca_attention_fwd_tiled_staged", True,
          "tiled_unsigned GEMMs; softmax rows staged through shared memory so loads and stores coalesce"),
    Entry("dmca_attention_bwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element"),
    Entry("dmca_attention_bwd", "numba_cuda", "tiled", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_bwd_tiled", False,
          "tiled GEMMs for dv = P^T dout, dP = dout v^T, dq = dS k, dk = dS^T q"),
    Entry("dmca_attention_bwd", "numba_cuda", "tiled_unsigned",
          "sparx_ref.kernels.numba_cuda.attention:dmca_attention_bwd_tiled_unsigned", False,
          "the tiled kernels with unsigned 64-bit indices: no per-access negative-index fix-ups"),
    Entry("dmca_attention_bwd", "numba_cuda", "tiled_staged",
          "sparx_ref.kernels.numba_cuda.attention:dmca_attention_bwd_tiled_staged", True,
          "tiled_unsigned GEMMs; the softmax backward rows staged through shared memory"),
    Entry("window_attention_fwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:window_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element, intermediates in device memory"),
    Entry("window_attention_fwd", "cupy", "fused", "sparx_ref.kernels.cupy.attention:window_attention_fwd_fused", False,
          "one block per (window, head): N x N scores in shared memory, fused bias+mask+softmax+P v, 4x4 register tiles"),
    Entry("window_attention_fwd", "cupy", "static", "sparx_ref.kernels.cupy.attention:window_attention_fwd_static", True,
          "the fused kernel compiled per (N, hd): constant loop bounds unrolled, score tiles in registers"),
    Entry("window_attention_bwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:window_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element, dS through device memory, dbias by a column sum"),
    Entry("window_attention_bwd", "cupy", "fused", "sparx_ref.kernels.cupy.attention:window_attention_bwd_fused", False,
          "one block per (head, window set): P and dS in shared memory, dbias in per-block slabs (no atomics)"),
    Entry("window_attention_bwd", "cupy", "static", "sparx_ref.kernels.cupy.attention:window_attention_bwd_static", True,
          "the fused backward compiled per (N, hd): unrolled, bias-gradient shares in registers across windows"),
    Entry("dmca_attention_fwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:dmca_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element"),
    Entry("dmca_attention_fwd", "cupy", "tiled", "sparx_ref.kernels.cupy.attention:dmca_attention_fwd_tiled", True,
          "shared-memory tiled GEMMs (64x64 tile, 4x4 per thread), coalesced along the contiguous axis"),
    Entry("dmca_attention_bwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:dmca_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element"),
    Entry("dmca_attention_bwd", "cupy", "tiled", "sparx_ref.kernels.cupy.attention:dmca_attention_bwd_tiled", True,
          "tiled GEMMs for dv = P^T dout, dP = dout v^T, dq = dS k, dk = dS^T q"),
]


# --- depthwise "same" convolution (issue 7: PyTorch's float32 depthwise backward was the largest
# item of a SparX-Mamba training step). The same ladder on both GPU backends (the Numba module is
# a port of the CuPy one); the GPU timings are in benchmarks/RESULTS.md.
_TABLE += [
    Entry(op, backend, version, f"sparx_ref.kernels.{backend}.conv:{op}{suffix}", version == "strip", idea)
    for backend in ("numba_cuda", "cupy")
    for version, suffix, ideas in (
        ("naive", "_naive", ("one thread per output element reads its kh*kw neighbours",
                             "dx by the forward kernel with the filter turned 180 degrees; filter and "
                             "bias sums one block per (channel, tap), x read kh*kw + 1 times")),
        ("strip", "", ("a thread computes 4 neighbouring outputs of a row; each input row segment is "
                       "read once into registers and reused by all 4",
                       "one fused pass: a block per (channel, batch slice) writes dx and sums dy * x "
                       "per tap in registers; slices added in order (deterministic, no atomics)")))
    for op, idea in zip(("depthwise_conv2d_fwd", "depthwise_conv2d_bwd"), ideas)
]


# --- group normalisation (issue 7: SparX-Mamba's ~50 GroupNorm(1, C) a forward). PyTorch computes
# the statistics with one block per (sample, group), 64 blocks at batch 64; these kernels split
# them over (sample, channel) planes. CuPy only: through launch plans a call costs the twins tens
# of microseconds of host time, where Numba's array path would cost hundreds.
_TABLE += [
    Entry("group_norm_fwd", "cupy", "plane", "sparx_ref.kernels.cupy.norm:group_norm_fwd", True,
          "a warp per (sample, channel) plane: its mean and M2 in two passes; the group's planes "
          "combined exactly (Chan); then one thread per element normalises"),
    Entry("group_norm_bwd", "cupy", "plane", "sparx_ref.kernels.cupy.norm:group_norm_bwd", True,
          "a warp per plane sums dy and dy * xhat; per channel over the batch in order (dweight, "
          "dbias) and per group with the weights; then one thread per element writes dx"),
]

def entries(op: str | None = None, backend: str | None = None) -> list[Entry]:
    """All table rows, optionally filtered by op and/or backend."""
    return [e for e in _TABLE if (op is None or e.op == op) and (backend is None or e.backend == backend)]


def registered() -> list[tuple[str, str]]:
    """Every (op, backend) pair that has a kernel, whether or not its runtime is present."""
    seen: list[tuple[str, str]] = []
    for e in _TABLE:
        if (e.op, e.backend) not in seen:
            seen.append((e.op, e.backend))
    return seen


def versions(op: str, backend: str) -> list[str]:
    """The ladder of versions registered for (op, backend), in table order."""
    return [e.version for e in entries(op, backend)]


def runtime_missing(backend: str) -> str | None:
    """None if ``backend`` can run here, else a sentence saying what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba_cpu":
        try:
            import numba  # noqa: F401
        except ImportError:
            return "backend 'numba_cpu' needs Numba: pip install numba"
        return None
    if backend == "numba_cuda":
        try:
            from numba import cuda
        except ImportError:
            return "backend 'numba_cuda' needs Numba with CUDA support: pip install 'numba-cuda[cu13]'"
        try:
            ok = cuda.is_available()
        except Exception as exc:  # driver problems
            return f"backend 'numba_cuda' found no usable GPU ({exc})"
        if not ok:
            return "backend 'numba_cuda' found no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 for the simulator)"
        return None
    # cupy
    try:
        import cupy
    except ImportError:
        return "backend 'cupy' needs CuPy: pip install cupy-cuda13x"
    try:
        ok = cupy.is_available()
    except Exception as exc:
        return f"backend 'cupy' found no usable GPU ({exc})"
    if not ok:
        return "backend 'cupy' found no CUDA GPU (CuPy imports on a CPU machine but cannot allocate)"
    return None


def available(backend: str) -> bool:
    return runtime_missing(backend) is None


def get(op: str, backend: str, version: str | None = None):
    """Return the kernel for (op, backend[, version]); the default version if none given.

    Raises KeyError for an unknown combination (listing what exists) and
    KernelUnavailable when the backend's runtime is missing on this machine.
    """
    rows = entries(op, backend)
    if not rows:
        raise KeyError(f"no kernel registered for op={op!r}, backend={backend!r}; registered: {registered()}")
    if version is None:
        rows = [e for e in rows if e.default]
    else:
        rows = [e for e in rows if e.version == version]
        if not rows:
            raise KeyError(f"no version {version!r} of ({op!r}, {backend!r}); versions: {versions(op, backend)}")
    missing = runtime_missing(backend)
    if missing:
        raise KernelUnavailable(missing)
    module, attr = rows[0].target.split(":")
    return getattr(importlib.import_module(module), attr)
