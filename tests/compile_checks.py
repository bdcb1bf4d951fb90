"""Compile every GPU kernel for sm_90 on a machine without a GPU.

Run in its own process with the simulator OFF (the Makefile does:
``NUMBA_ENABLE_CUDASIM=0 pytest tests/compile_checks.py``): the simulator does not
type-check kernels, so this is what catches an un-jitted helper or a bad signature.

Contract for kernel modules (enumerated from the registry, so a new module is covered):
- a ``numba_cuda`` module exposes ``PTX_KERNELS``: a list of
  ``(name, python_function, signature_string)`` for every ``@cuda.jit`` kernel it launches
  (the undecorated function, or the dispatcher's ``py_func``);
- a ``cupy`` module exposes ``CUDA_SOURCES``: a dict ``name -> CUDA C source`` and
  optionally ``NVRTC_OPTIONS`` (a tuple of str) for every RawModule/RawKernel it builds.
"""
import importlib
import os

import pytest

from sparx_ref.kernels import entries

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    pytest.skip("compile checks need the CUDA simulator off", allow_module_level=True)


def _modules(backend):
    return sorted({e.target.split(":")[0] for e in entries(backend=backend)})


def _numba_kernels():
    out = []
    for mod in _modules("numba_cuda"):
        m = importlib.import_module(mod)
        assert hasattr(m, "PTX_KERNELS"), f"{mod} must expose PTX_KERNELS"
        for name, fn, sig in m.PTX_KERNELS:
            out.append(pytest.param(fn, sig, id=f"{mod.rsplit('.', 1)[-1]}.{name}:{sig}"))
    return out


def _cupy_sources():
    out = []
    for mod in _modules("cupy"):
        m = importlib.import_module(mod)
        assert hasattr(m, "CUDA_SOURCES"), f"{mod} must expose CUDA_SOURCES"
        opts = tuple(getattr(m, "NVRTC_OPTIONS", ()))
        for name, src in m.CUDA_SOURCES.items():
            out.append(pytest.param(name, src, opts, id=f"{mod.rsplit('.', 1)[-1]}.{name}"))
    return out


@pytest.mark.parametrize("fn,sig", _numba_kernels())
def test_numba_cuda_kernel_compiles_for_sm90(fn, sig):
    from numba import cuda
    fn = getattr(fn, "py_func", fn)
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".target sm_90" in ptx


def _nvrtc(src, name, opts, arch="compute_90", output="ptx"):
    """Compile CUDA C ``src`` with NVRTC for ``arch`` (compute_90: PTX; sm_90: ptxas inside, a
    cubin); returns the PTX text or the cubin bytes. A failed compile fails the test with
    NVRTC's log."""
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(src.encode(), f"{name}.cu".encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    args = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"] + [o.encode() for o in opts]
    (res,) = nvrtc.nvrtcCompileProgram(prog, len(args), args)
    if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        pytest.fail(f"NVRTC failed for {name} {opts}:\n{log.decode(errors='replace')}")
    if output == "cubin":
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.decode(errors="replace")


@pytest.mark.parametrize("name,src,opts", _cupy_sources())
def test_cupy_source_compiles_for_compute90(name, src, opts):
    assert ".target sm_90" in _nvrtc(src, name, opts)


# --- ss2d "quad" forward (sparx_ref/kernels/{numba_cuda,cupy}/ss2d.py): besides compiling, its
# per-lane register arrays (ITEMS steps x NSTATE) must stay in registers: no .local, no .f64
@pytest.mark.parametrize("n", range(5))
def test_ss2d_quad_numba_ptx_has_no_local_memory_and_no_f64(n):
    from numba import cuda
    from sparx_ref.kernels.numba_cuda.ss2d import PTX_KERNELS
    assert len(PTX_KERNELS) == 5
    name, fn, sig = PTX_KERNELS[n]
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    assert ".local" not in ptx and ".f64" not in ptx, name
    vector_loads = ptx.count("ld.global.nc.v4.f32") + ptx.count("ld.global.v4.f32")
    # "_v": delta, B and C in 16-byte loads (this round's and the next's); else none
    assert (vector_loads >= 6) if name.endswith("_v") else (vector_loads == 0), (name, vector_loads)


# --- Numba cross-scan/merge "tiled_unsigned": with uint64 indices Numba emits no negative-index
# wrap-around fix-up (the shr.s64 of the sign test), so the kernel is a quarter of the signed one.
@pytest.mark.parametrize("op", ["cross_scan", "cross_merge"])
def test_numba_unsigned_tiles_have_no_wraparound_fixups(op):
    from numba import cuda
    from sparx_ref.kernels.numba_cuda.scan import PTX_KERNELS
    ptx = {name: cuda.compile_ptx(fn, sig, cc=(9, 0))[0] for name, fn, sig in PTX_KERNELS
           if name in (f"{op}_tiled", f"{op}_tiled_unsigned")}
    signed, unsigned = ptx[f"{op}_tiled"], ptx[f"{op}_tiled_unsigned"]
    assert "shr.s64" in signed and "shr.s64" not in unsigned
    assert len(unsigned.splitlines()) < len(signed.splitlines()) / 2


# --- Numba DMCA "tiled_unsigned" (sparx_ref/kernels/numba_cuda/attention.py): with uint64 indices
# Numba emits no negative-index wrap-around fix-up (the shr.s64 of the sign test) and no float64
# from a stray uint64-int64 mix; the GEMM's inner product loop is under half the signed one (the
# whole GEMM is not shorter: LLVM now fully unrolls its tile-loading loop, four layouts of it).
def _ptx_loop_around_first(ptx, op):
    """Instructions of the loop (label ... back-branch to it) that holds the first `op` line."""
    import re
    lines = [ln.strip() for ln in ptx.splitlines()]
    first = next(n for n, ln in enumerate(lines) if ln.startswith(op))
    top = max(n for n in range(first) if re.fullmatch(r"\$L__BB\d+_\d+:", lines[n]))
    back_branch = re.compile(r"bra(\.uni)?\s+" + re.escape(lines[top][:-1]) + ";")
    back = next(n for n in range(first, len(lines)) if back_branch.search(lines[n]))
    return [ln for ln in lines[top + 1:back + 1] if ln and not ln.startswith(("//", "$"))]


@pytest.mark.parametrize("kernel", ["bmm_tiled", "softmax_rows", "softmax_bwd_rows"])
def test_numba_dmca_unsigned_kernels_have_no_wraparound_fixups(kernel):
    from numba import cuda
    from sparx_ref.kernels.numba_cuda.attention import PTX_KERNELS
    ptx = {name: cuda.compile_ptx(fn, sig, cc=(9, 0))[0] for name, fn, sig in PTX_KERNELS
           if name in (f"{kernel}_float32", f"{kernel}_unsigned_float32")}
    signed, unsigned = ptx[f"{kernel}_float32"], ptx[f"{kernel}_unsigned_float32"]
    assert "shr.s64" in signed and "shr.s64" not in unsigned and ".f64" not in unsigned
    if kernel == "bmm_tiled":
        inner = _ptx_loop_around_first(unsigned, "fma.rn.f32")
        inner_signed = _ptx_loop_around_first(signed, "fma.rn.f32")
        assert len(inner) < len(inner_signed) / 2, (len(inner), len(inner_signed))   # 53 vs 126 (numba 0.68)
    else:
        assert len(unsigned.splitlines()) < len(signed.splitlines()) * 0.7          # ~0.53 (numba 0.68)


# --- Numba DMCA "tiled_staged": the softmax rows staged through shared memory, uint64 indices
# throughout (no wrap-around fix-ups, no float64 in the float32 kernels, nothing in local memory).
@pytest.mark.parametrize("kernel", ["softmax_rows_staged", "softmax_bwd_rows_staged"])
def test_numba_dmca_staged_softmax_kernels_have_no_wraparound_fixups(kernel):
    from numba import cuda
    from sparx_ref.kernels.numba_cuda.attention import PTX_KERNELS
    fn, sig = next((fn, sig) for name, fn, sig in PTX_KERNELS if name == f"{kernel}_float32")
    ptx = cuda.compile_ptx(fn, sig, cc=(9, 0))[0]
    assert "shr.s64" not in ptx and ".f64" not in ptx and ".local" not in ptx
    assert "ld.shared.f32" in ptx and "st.shared.f32" in ptx and "bar.sync" in ptx


# --- Numba window attention "static_unsigned" (same file): the static kernels with uint64 indices.
# Signed, every shared-memory read of a 4x4 score / output tile carries the wrap-around fix-up (the
# tile's rows and columns come out of a local array, so Numba cannot prove them >= 0).
@pytest.mark.parametrize("kernel", ["window_fwd_static", "window_bwd_static"])
def test_numba_window_static_unsigned_kernels_have_no_wraparound_fixups(kernel):
    from numba import cuda
    from sparx_ref.kernels.numba_cuda.attention import PTX_KERNELS
    ptx = {name: cuda.compile_ptx(fn, sig, cc=(9, 0))[0] for name, fn, sig in PTX_KERNELS
           if name in (f"{kernel}_float32", f"{kernel}_unsigned_float32")}
    signed, unsigned = ptx[f"{kernel}_float32"], ptx[f"{kernel}_unsigned_float32"]
    assert "shr.s64" in signed and "shr.s64" not in unsigned and ".f64" not in unsigned
    assert ".local" not in unsigned             # the register tiles stay in registers
    # the first tile loop (scores q k^T / dP = dout v^T): 57 vs 157 instructions (numba 0.68)
    inner = _ptx_loop_around_first(unsigned, "fma.rn.f32")
    inner_signed = _ptx_loop_around_first(signed, "fma.rn.f32")
    assert sum(ln.startswith("fma.rn.f32") for ln in inner) == sum(ln.startswith("fma.rn.f32") for ln in inner_signed)
    assert len(inner) < len(inner_signed) / 2, (len(inner), len(inner_signed))
    assert len(unsigned.splitlines()) < len(signed.splitlines()) * 0.6          # ~0.45 (numba 0.68)


@pytest.mark.parametrize("opts", [("-DNSTATE=1", "-DITEMS=4"), ("-DNSTATE=2", "-DITEMS=4"),
                                  ("-DNSTATE=1", "-DITEMS=8"), ("-DNSTATE=1", "-DITEMS=2")])
def test_ss2d_quad_cuda_ptx_has_no_local_memory_and_no_f64(opts):
    from sparx_ref.kernels.cupy.ss2d import CUDA_SOURCES
    ptx = _nvrtc(CUDA_SOURCES["ss2d_quad"], "ss2d_quad", opts)
    assert ".local" not in ptx and ".f64" not in ptx, opts
    assert ptx.count("atom.shared.add.f32") + ptx.count("red.shared.add.f32") > 0, "shared atomics"


# --- selective scan "vec" rung (sparx_ref/kernels/{numba_cuda,cupy}/scan.py): besides compiling,
# its per-lane arrays (ITEMS steps x NSTATE, two rounds in flight) must stay in registers (no
# .local), no float64 may creep in (.f64), and the vector variants must really issue 16-byte loads.
@pytest.mark.parametrize("nstate,seg,items,vec", [(1, 32, 4, 1), (1, 32, 4, 0), (1, 16, 4, 1), (1, 8, 4, 0),
                                                  (2, 32, 4, 1), (1, 32, 2, 1), (1, 32, 8, 1)])
def test_scan_vec_cuda_ptx_has_no_local_memory_and_no_f64(nstate, seg, items, vec):
    from sparx_ref.kernels.cupy.scan import CUDA_SOURCES
    ptx = _nvrtc(CUDA_SOURCES["scan_vec"], "scan_vec",
                     (f"-DNSTATE={nstate}", f"-DSEG={seg}", f"-DITEMS={items}", f"-DVEC={vec}"))
    assert ".local" not in ptx and ".f64" not in ptx
    width = 4 if items % 4 == 0 else 2
    assert (f"ld.global.nc.v{width}.f32" in ptx) == bool(vec)
    assert (f"st.global.v{width}.f32" in ptx) == bool(vec)


def _cubin_kernel_resources(cubin: bytes) -> dict:
    """{function symbol: {"regs": n, "frame": bytes}} from a cubin's .nv.info sections
    (EIATTR_REGCOUNT 0x2f, EIATTR_FRAME_SIZE 0x11: a non-zero frame = spilled registers)."""
    import struct
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def cstr(base, off):
        return cubin[base + off:cubin.index(b"\0", base + off)].decode()
    names = [cstr(secs[shstrndx][4], s[0]) for s in secs]
    symtab, strtab = secs[names.index(".symtab")], secs[names.index(".strtab")]
    syms = [cstr(strtab[4], struct.unpack_from("<I", cubin, symtab[4] + 24 * i)[0]) for i in range(symtab[5] // 24)]
    out = {}
    for sec, name in zip(secs, names):
        if not name.startswith(".nv.info"):
            continue
        p, end = sec[4], sec[4] + sec[5]
        while p < end:
            fmt, attr, size = struct.unpack_from("<BBH", cubin, p)
            if fmt == 4:            # EIFMT_SVAL: a payload of `size` bytes follows
                if attr in (0x2F, 0x11):
                    sym, val = struct.unpack_from("<II", cubin, p + 4)
                    out.setdefault(syms[sym], {})["regs" if attr == 0x2F else "frame"] = val
                p += 4 + size
            else:
                p += 4
    return out


@pytest.mark.parametrize("name", ["scan_fwd_vec_N1_S32_I4_v", "scan_bwd_vec_N1_S32_I4_v", "scan_fwd_vec_N1_S16_I4_v",
                                  "scan_bwd_vec_N1_S16_I4_v", "scan_bwd_vec_N2_S32_I4_v", "scan_fwd_vec_N1_S8_I4_s",
                                  "scan_fwd_vec_N1_S16_I4_s_1r", "scan_bwd_vec_N1_S16_I4_s_1r",
                                  "scan_fwd_vec_N1_S16_I4_v_1r", "scan_bwd_vec_N1_S16_I4_v_1r"])
def test_scan_vec_numba_ptx_has_no_local_memory_and_no_f64(name):
    """Compiled with the launch bounds the module launches them with; then (nvJitLink present)
    linked for sm_90: no spilled registers, and the register count printed. Name parts: N<d_state>,
    v / s (vector / scalar loads), 1r (rows of one round)."""
    from numba import cuda
    from sparx_ref.kernels.numba_cuda.scan import PTX_KERNELS, vec_launch_bounds
    (fn, sig), = [(f, s) for n, f, s in PTX_KERNELS if n == name]
    parts = name.split("_")
    vec, one_round = "v" in parts, "1r" in parts
    ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0), launch_bounds=vec_launch_bounds(fn.__name__, int(name[14]), vec,
                                                                                   one_round))
    assert ".local" not in ptx and ".f64" not in ptx, name
    assert ("ld.global.v4.f32" in ptx) == vec, name
    res = _linked_resources(ptx, name, fn.__name__)
    if res is None:
        return
    print(name, res)
    assert res and res[0].get("frame", 0) == 0, (name, res)


def _linked_resources(ptx, name, function):
    """[{"regs", "frame"}] of the kernel ``function`` after linking ``ptx`` for sm_90 with
    nvJitLink (ptxas inside), or None when nvJitLink is not installed."""
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        return None
    h = nvjitlink.create(1, ["-arch=sm_90"])
    nvjitlink.add_data(h, nvjitlink.InputType.PTX, ptx.encode(), len(ptx), name)
    nvjitlink.complete(h)
    cubin = bytearray(nvjitlink.get_linked_cubin_size(h))
    nvjitlink.get_linked_cubin(h, cubin)
    return [v for k, v in _cubin_kernel_resources(bytes(cubin)).items() if function in k]


@pytest.mark.parametrize("opts", [("-DNSTATE=1", "-DSEG=32", "-DITEMS=4", "-DVEC=1"),
                                  ("-DNSTATE=1", "-DSEG=16", "-DITEMS=4", "-DVEC=0"),
                                  ("-DNSTATE=1", "-DSEG=16", "-DITEMS=4", "-DVEC=0", "-DONE_ROUND=1")])
def test_scan_vec_cuda_cubin_spills_nothing(opts):
    """NVRTC for sm_90 (ptxas inside): the vec kernels keep everything in registers."""
    from sparx_ref.kernels.cupy.scan import CUDA_SOURCES
    info = _cubin_kernel_resources(_nvrtc(CUDA_SOURCES["scan_vec"], "scan_vec", opts, arch="sm_90", output="cubin"))
    print(opts, info)
    for kernel in ("scan_fwd_vec", "scan_bwd_vec"):
        assert info[kernel].get("frame", 0) == 0 and info[kernel]["regs"] <= 128, (kernel, info[kernel])
        if "-DONE_ROUND=1" in opts:   # the point of the variant: no next-round registers, no pass 1
            assert info[kernel]["regs"] <= 64, (kernel, info[kernel])


# --- depthwise conv (sparx_ref/kernels/cupy/conv.py): the strip kernels keep their row segments
# and the backward's kh*kw + 1 filter sums in registers for every kernel size the twins use
# (1 LayerScale, 3, 5) and the largest allowed (7), in both dtypes: no .local, no spill frame,
# and few enough registers that a 256-thread block can launch (256 x regs <= 65536).
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_depthwise_conv_cuda_cubin_spills_nothing(dtype, k):
    from sparx_ref.kernels.cupy.conv import CUDA_SOURCES, nvrtc_options
    opts = nvrtc_options(dtype, k, k)[1:]          # _nvrtc passes -std=c++17 itself
    src = CUDA_SOURCES["depthwise_conv2d"]
    ptx = _nvrtc(src, "depthwise_conv2d", opts)
    assert ".local" not in ptx, opts
    assert (".f64" in ptx) == (dtype == "float64"), opts
    info = _cubin_kernel_resources(_nvrtc(src, "depthwise_conv2d", opts, arch="sm_90", output="cubin"))
    print(dtype, k, info)
    for kernel in ("dw_fwd_strip", "dw_bwd_strip", "dw_fwd_naive", "dw_wgrad_naive", "dw_bwd_finish"):
        assert info[kernel].get("frame", 0) == 0 and info[kernel]["regs"] <= 65536 // 256, (kernel, info[kernel])


# --- depthwise conv "strip", Numba (sparx_ref/kernels/numba_cuda/conv.py): the kernels are built per
# (dtype, kh, kw), so the row segments, the dx accumulators and the backward's kh*kw + 1 filter sums
# are local arrays of compile-time size whose loops unroll completely: they must stay in registers
# (no .local; linked for sm_90, no spill frame). Sizes are uint32 and indices uint64: no wrap-around
# fix-up (shr.s64), no float64 in the float32 kernels, and the divisions 32-bit as in the CUDA C.
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("kernel", ["dw_fwd_strip", "dw_bwd_strip"])
def test_numba_depthwise_conv_strip_ptx_has_no_local_memory(kernel, k):
    from numba import cuda
    from sparx_ref.kernels.numba_cuda.conv import PTX_KERNELS, STRIP
    name = f"{kernel}_k{k}x{k}_float32"
    (fn, sig), = [(f, s) for n, f, s in PTX_KERNELS if n == name]
    ptx = cuda.compile_ptx(fn, sig, cc=(9, 0))[0]
    assert ".local" not in ptx, name
    assert "shr.s64" not in ptx and ".f64" not in ptx, name
    assert "div.u64" not in ptx and "rem.u64" not in ptx and "div.u32" in ptx, name
    # unrolled FMAs: the backward indexes its filter sums by (row, column) of the filter, so its row
    # loop must unroll too (k*k*V FMAs for dx, as many for dweight); the forward's row loop may stay
    # a loop (its segment and accumulators are indexed by the inner loops only): one row, k*V
    fmas = sum(ln.strip().startswith("fma.rn.f32") for ln in ptx.splitlines())
    assert fmas >= (2 * k * k * STRIP if kernel == "dw_bwd_strip" else k * STRIP), (name, fmas)
    if kernel == "dw_bwd_strip":
        assert "shfl.sync.bfly" in ptx and "bar.sync" in ptx, name      # warp shuffles, then the warps
    res = _linked_resources(ptx, name, fn.__name__)
    print(name, res)
    assert res is None or (res and res[0].get("frame", 0) == 0), (name, res)


# --- group normalisation (sparx_ref/kernels/cupy/norm.py): both dtypes compile; the float32 module
# does no double arithmetic (a stray double constant would halve its throughput on most cards),
# and nothing spills.
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_group_norm_cuda_compiles_without_spills_or_stray_doubles(dtype):
    from sparx_ref.kernels.cupy.norm import CUDA_SOURCES, nvrtc_options
    opts = nvrtc_options(dtype)[1:]                # _nvrtc passes -std=c++17 itself
    src = CUDA_SOURCES["group_norm"]
    ptx = _nvrtc(src, "group_norm", opts)
    assert ".local" not in ptx, opts
    assert (".f64" in ptx) == (dtype == "float64"), opts
    info = _cubin_kernel_resources(_nvrtc(src, "group_norm", opts, arch="sm_90", output="cubin"))
    for kernel in ("gn_plane_moments", "gn_row_stats", "gn_normalize", "gn_bwd_plane_sums", "gn_bwd_reduce",
                   "gn_bwd_dx"):
        assert info[kernel].get("frame", 0) == 0 and info[kernel]["regs"] <= 65536 // 256, (kernel, info[kernel])
