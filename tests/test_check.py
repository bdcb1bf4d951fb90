"""sparx_ref.check: golden vectors out, results in, the Python API and the torch-module helper.

Correct implementations (the oracle in float64 and float32, the PyTorch twins, the torch ops
of the twins, the registered kernels that can run here) must pass; planted bugs (a swapped
scan direction, a missing softplus, the cyclic shift rolled the wrong way, ganglion sources
concatenated in the wrong order) must fail, at the right op or block, with exit code 1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparx_ref
from sparx_ref import cli
from sparx_ref.check import check_golden, golden_inputs, load_golden, oracle_results, write_golden
from sparx_ref.check.models import MINI_CONFIGS, model_config, required_activation
from sparx_ref.check.ops import OPS
from sparx_ref.kernels import registry
from sparx_ref.ref import scan as ref_scan
from sparx_ref.ref import ss2d as ref_ss2d
from sparx_ref.ref import window_attention as ref_wa
from sparx_ref.tolerances import tolerance

REPO = Path(__file__).resolve().parents[1]


def _run_cli(args, capsys):
    code = cli.main(list(map(str, args)))
    return code, capsys.readouterr().out


def _save(path, results):
    np.savez(path, **results)
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Numba's OpenMP threading layer raises torch's (shared libgomp) thread count to the core
    count once a parallel kernel ran; on a busy 2-core machine that makes the torch twins many
    times slower. Pin torch to one thread for these tests and restore it afterwards."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def goldens(tmp_path_factory):
    """Golden directories written once per module: every op (float64) and the three minis."""
    root = tmp_path_factory.mktemp("golden")
    dirs = {}
    for name in list(OPS) + list(MINI_CONFIGS):
        write_golden(name, root / name, dtype="float64", seed=3)
        dirs[name] = root / name
    return dirs


# ---------------------------------------------------------------------------------------
# golden files: contents, exact round trip, float32
# ---------------------------------------------------------------------------------------
def test_cli_golden_writes_documented_manifest(tmp_path, capsys):
    code, out = _run_cli(["golden", "selective_scan", "--dtype", "float32", "--seed", "7",
                          "--config", '{"L": 11, "delta_softplus": true}', "-o", tmp_path], capsys)
    assert code == 0 and "golden.npz" in out
    manifest, arrays = load_golden(tmp_path)            # also verifies the sha256
    assert manifest["name"] == "selective_scan" and manifest["kind"] == "op"
    assert manifest["seed"] == 7 and manifest["config"]["L"] == 11 and manifest["dtype"] == "float32"
    assert manifest["tolerance"]["out"] == {"kind": "kernel", "value": tolerance("float32", "kernel")}
    assert manifest["results"] == ["out.y", "grad.u", "grad.delta", "grad.A", "grad.B", "grad.C",
                                   "grad.D", "grad.delta_bias"]
    assert set(manifest["keys"]) == set(arrays)
    for key, entry in manifest["keys"].items():
        assert entry["shape"] == list(arrays[key].shape) and entry["dtype"] == arrays[key].dtype.name
        assert entry["doc"]
    assert arrays["in.u"].dtype == np.float32 and arrays["in.u"].shape == (2, 8, 11)
    assert arrays["out.y"].dtype == np.float64            # the reference stays float64
    assert arrays["cot.y"].shape == arrays["out.y"].shape and np.std(arrays["cot.y"]) > 0.5
    # the stored reference is the oracle's on the stored inputs
    x = {k[3:]: v.astype(np.float64) for k, v in arrays.items() if k.startswith("in.")}
    y, _ = ref_scan.selective_scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],
                                       x["delta_bias"], True)
    np.testing.assert_array_equal(y, arrays["out.y"])


def test_golden_files_are_reproducible(tmp_path):
    """Same name, config and seed: the same bytes (fixed zip timestamps), so the same sha256."""
    first = json.loads(write_golden("dmca_attention", tmp_path / "a", seed=2).read_text())
    second = json.loads(write_golden("dmca_attention", tmp_path / "b", seed=2).read_text())
    other = json.loads(write_golden("dmca_attention", tmp_path / "c", seed=3).read_text())
    assert first["sha256"] == second["sha256"] != other["sha256"]
    assert (tmp_path / "a" / "golden.npz").read_bytes() == (tmp_path / "b" / "golden.npz").read_bytes()


def test_tampered_golden_is_refused(tmp_path, capsys):
    write_golden("cross_scan", tmp_path / "g")
    results = _save(tmp_path / "r.npz", oracle_results(tmp_path / "g"))
    with np.load(tmp_path / "g" / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["out.xs"] = arrays["out.xs"] + 1.0
    np.savez_compressed(tmp_path / "g" / "golden.npz", **arrays)
    capsys.readouterr()
    assert cli.main(["check", str(tmp_path / "g"), str(results)]) == 2
    assert "sha256" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(OPS))
def test_oracle_reads_back_exactly(goldens, name, tmp_path, capsys):
    """golden -> oracle on the stored inputs -> check: error exactly 0, exit code 0."""
    results = _save(tmp_path / "r.npz", oracle_results(goldens[name]))
    code, out = _run_cli(["check", goldens[name], results], capsys)
    assert code == 0, out
    report = check_golden(goldens[name], results)
    assert report.passed and report.rows
    assert all(r.max_abs == 0.0 and r.max_rel == 0.0 for r in report.rows)
    assert {r.key for r in report.rows} == set(load_golden(goldens[name])[0]["results"])
    assert "PASSED" in out


@pytest.mark.parametrize("name", list(MINI_CONFIGS))
def test_model_golden_reads_back_exactly(goldens, name):
    manifest, arrays = load_golden(goldens[name])
    report = check_golden(goldens[name], oracle_results(goldens[name]))
    assert report.passed and all(r.max_abs == 0.0 for r in report.rows)
    acts = [k for k in manifest["results"] if k.startswith("act.")]
    assert acts[0] == "act.patch_embed" and "act.layers.0.blocks.1" in acts
    assert manifest["keys"]["act.layers.0.blocks.1"]["required"] is True
    assert manifest["tolerance"]["act"]["kind"] == "golden_out"
    assert manifest["tolerance"]["grad"]["kind"] == "golden_grad"
    # every parameter has a gradient and the weights are non-trivial test weights
    params = [k[6:] for k in arrays if k.startswith("param.") and arrays[k].dtype.kind == "f"]
    grads = {k[5:] for k in manifest["results"] if k.startswith("grad.")}
    assert "x" in grads and len(grads) > 10
    biases = [k for k in params if k.endswith(".bias")]
    assert biases and all(np.any(arrays[f"param.{k}"] != 0) for k in biases)


@pytest.mark.parametrize("name", list(OPS) + ["swin"])
def test_float32_oracle_passes_float32_golden(goldens, tmp_path, name):
    write_golden(name, tmp_path, dtype="float32", seed=5)
    report = check_golden(tmp_path, oracle_results(tmp_path, dtype="float32"))
    assert report.passed, str(report)
    assert report.dtype == "float32" and max(r.max_rel for r in report.rows) > 0  # really float32
    # the same float32 results fail the float64 tolerances, and the note says why
    strict = check_golden(tmp_path, oracle_results(tmp_path, dtype="float32"), dtype="float64")
    assert not strict.passed and any("float32" in n for n in strict.notes)


# ---------------------------------------------------------------------------------------
# correct implementations pass
# ---------------------------------------------------------------------------------------
def test_torch_twin_ops_pass_python_api(rng):
    torch = pytest.importorskip("torch")
    from sparx_ref.torch_models import common

    cfg = OPS["selective_scan"].defaults
    x = {k: torch.tensor(v, requires_grad=True) for k, v in OPS["selective_scan"].make_inputs(cfg, rng).items()}
    y = common.selective_scan_torch(*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")),
                                    delta_softplus=True)
    cot = rng.standard_normal(tuple(y.shape))
    (y * torch.tensor(cot)).sum().backward()
    report = sparx_ref.check("selective_scan", x, {"y": y}, {k: v.grad for k, v in x.items()},
                             cotangent=cot)
    assert report.passed, str(report)
    assert len(report.rows) == 8 and report.first_divergence is None

    xm = torch.tensor(rng.standard_normal((2, 3, 4, 5)), requires_grad=True)
    xs = common.cross_scan_torch(xm)
    ys = torch.tensor(rng.standard_normal(tuple(xs.shape)))
    (xs * ys).sum().backward()
    assert sparx_ref.check("cross_scan", {"x": xm}, {"xs": xs}, {"x": xm.grad}, cotangent=ys).passed
    merged = common.cross_merge_torch(ys, 4, 5)
    assert sparx_ref.check("cross_merge", {"ys": ys}, {"y": merged}, config={"H": 4, "W": 5}).passed


@pytest.mark.parametrize("name", list(MINI_CONFIGS))
def test_torch_twins_pass_block_by_block(name):
    torch = pytest.importorskip("torch")
    from sparx_ref.check import check_torch_module
    from sparx_ref.torch_models import build_model

    cfg = {k: v for k, v in model_config(name).items() if k != "input_shape"}
    twin = build_model(name, **cfg).to(torch.float64)
    report = check_torch_module(twin, name, grads=True)
    assert report.passed, report.format(failures_only=True)
    keys = [r.key for r in report.rows]
    assert "act.layers.0.blocks.1" in keys and "out.logits" in keys and "grad.x" in keys
    assert all(r.max_rel < 1e-12 for r in report.rows)
    twin32 = build_model(name, **cfg)                      # float32: its own tolerances
    report32 = check_torch_module(twin32, name)
    assert report32.passed and report32.dtype == "float32", report32.format(failures_only=True)


def _kernel_impl(spec, backend):
    """The default kernels of ``backend`` for the functions of ``spec`` (NumPy in and out)."""
    from sparx_ref.testing import _to_numpy

    if backend == "numba_cuda":
        from numba import cuda
        to_dev = cuda.to_device
    elif backend == "cupy":
        import cupy
        to_dev = cupy.asarray
    else:
        def to_dev(a):
            return a

    def wrap(fn, is_bwd):
        def call(*args, **kwargs):
            args = [to_dev(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args]
            out = fn(*args, **kwargs)
            if is_bwd:
                return {k: (None if v is None else _to_numpy(v)) for k, v in out.items()}
            if isinstance(out, tuple):
                return (_to_numpy(out[0]),) + tuple(out[1:])
            return _to_numpy(out)
        return call

    impl = {}
    for fn in spec.functions:
        if (fn, backend) in registry.registered():
            impl[fn] = wrap(registry.get(fn, backend), fn.endswith("_bwd"))
    return impl


def _kernel_cases():
    """(op, backend) for every op of the checker whose forward has a registered kernel."""
    cases = []
    for name, spec in OPS.items():
        for backend in registry.BACKENDS:
            if any((f, backend) in registry.registered() for f in spec.functions if not f.endswith("_bwd")):
                cases.append((name, backend))
    return cases or [("none", "none")]


# small sizes for the CUDA simulator, which runs every GPU thread in Python
_SIMULATOR_CONFIGS = {
    "selective_scan": dict(batch=1, KD=4, K=2, N=2, L=5),
    "ss2d_scan": dict(batch=1, Di=1, N=2, H=2, W=3),
    "window_attention": dict(batch=1, H=4, W=4, window=2, shift=1, heads=2, head_dim=4),
    "dmca_attention": dict(batch=1, C=8, Ls=4, L=9),
}


@pytest.mark.parametrize("name, backend", _kernel_cases())
def test_registered_kernels_pass(name, backend, tmp_path):
    """Every registered kernel that can run here passes the op's float32 golden (float32 is
    the kernels' precision; the kernels' own tests cover float64 where supported)."""
    if name == "none":
        pytest.skip("no kernel registered for the checker's ops")
    if not registry.available(backend):
        pytest.skip(registry.runtime_missing(backend))
    spec = OPS[name]
    impl = _kernel_impl(spec, backend)
    simulated = backend == "numba_cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    config = _SIMULATOR_CONFIGS.get(name) if simulated else None
    write_golden(name, tmp_path, config=config, dtype="float32", seed=11)
    manifest, arrays = load_golden(tmp_path)
    inputs = {k: arrays.get(f"in.{k}") for k in spec.inputs}
    cots = {k[4:]: v for k, v in arrays.items() if k.startswith("cot.")}
    has_bwd = any(f.endswith("_bwd") for f in impl)
    outputs, grads = spec.run(inputs, manifest["config"], cots if has_bwd else None, impl=impl)
    results = {f"out.{k}": v for k, v in outputs.items()}
    results.update({f"grad.{k}": v for k, v in (grads or {}).items()})
    report = check_golden(tmp_path, results)
    assert report.passed, f"{name} on {backend}:\n{report}"
    assert report.rows[0].max_rel > 0 or name in ("cross_scan", "cross_merge")   # really ran in float32


# ---------------------------------------------------------------------------------------
# planted bugs are caught and located
# ---------------------------------------------------------------------------------------
def test_swapped_scan_direction_is_caught(goldens, tmp_path, capsys, monkeypatch):
    good = ref_ss2d.cross_scan

    def swapped(x):                      # directions 1 and 3 exchanged
        return good(x)[:, [0, 3, 2, 1]]

    results = _save(tmp_path / "xs.npz", oracle_results(goldens["cross_scan"]) |
                    {"out.xs": OPS["cross_scan"].run({"x": load_golden(goldens["cross_scan"])[1]["in.x"]},
                                                     {}, impl={"cross_scan": swapped})[0]["xs"]})
    code, out = _run_cli(["check", goldens["cross_scan"], results], capsys)
    assert code == 1
    report = check_golden(goldens["cross_scan"], results)
    assert report.first_divergence == "out.xs" and [r.key for r in report.failures] == ["out.xs"]
    assert report["out.xs"].worst_index[1] in (1, 3)       # the direction axis points at the bug
    assert "FAIL" in out and "first divergence: out.xs" in out
    # inside the whole 2-D scan and forward_ssm the same bug breaks the output
    monkeypatch.setattr(ref_ss2d, "cross_scan", swapped)
    for name in ("ss2d_scan", "forward_ssm"):
        key = "out.y" if name == "ss2d_scan" else "out.out"
        report = check_golden(goldens[name], oracle_results(goldens[name]))
        assert not report.passed and report.first_divergence == key, str(report)


def test_missing_softplus_is_caught(goldens, tmp_path, capsys):
    good = ref_scan.selective_scan_fwd

    def no_softplus(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
        return good(u, delta, A, B, C, D, delta_bias, False)

    g = goldens["selective_scan"]
    inputs = golden_inputs(g)
    cots = inputs.pop("cotangents")
    outputs, grads = OPS["selective_scan"].run(inputs, load_golden(g)[0]["config"], cots,
                                              impl={"selective_scan_fwd": no_softplus})
    results = {f"out.{k}": v for k, v in outputs.items()} | {f"grad.{k}": v for k, v in grads.items()}
    code, out = _run_cli(["check", g, _save(tmp_path / "r.npz", results)], capsys)
    assert code == 1 and "first divergence: out.y" in out
    # the Python API on the same inputs says the same
    report = sparx_ref.check("selective_scan", inputs, outputs, grads, cotangent=cots["y"])
    assert not report.passed and report.first_divergence == "out.y"
    assert report["out.y"].max_rel > 1e-2


def test_cyclic_shift_wrong_way_is_caught(goldens, tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    from sparx_ref.check import check_torch_module, torch_results
    from sparx_ref.torch_models import build_model
    from sparx_ref.torch_models import swin as twin_swin

    # op level: window_msa with the roll reversed (+s before attention, -s after)
    good = ref_wa.cyclic_shift
    monkeypatch.setattr(ref_wa, "cyclic_shift", lambda x, shift: good(x, -shift))
    report = check_golden(goldens["window_msa"], oracle_results(goldens["window_msa"]))
    assert not report.passed and report.first_divergence == "out.out"
    monkeypatch.setattr(ref_wa, "cyclic_shift", good)

    # model level: the Swin twin with the roll reversed in every block
    def wrong_roll(self, x, shortcut=None, rec=None, name=""):
        H, W = self.input_resolution
        B, L, C = x.shape
        M, s = self.window_size, self.shift_size
        u = self.mix_input(self.norm1(x), shortcut).view(B, H, W, C)
        u = torch.roll(u, shifts=(s, s), dims=(1, 2)) if s else u          # the bug: +s
        y = twin_swin.window_reverse(self.attn(twin_swin.window_partition(u, M), self.attn_mask), M, H, W)
        y = torch.roll(y, shifts=(-s, -s), dims=(1, 2)) if s else y
        x = x + y.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))

    cfg = {k: v for k, v in model_config("swin").items() if k != "input_shape"}
    twin = build_model("swin", **cfg).to(torch.float64)
    monkeypatch.setattr(twin_swin.SwinTransformerBlock, "forward", wrong_roll)
    report = check_torch_module(twin, "swin")
    assert not report.passed
    assert report.first_divergence == "layers.0.blocks.1"        # the first shifted block
    assert all(r.passed for r in report.rows if r.key in ("act.patch_embed", "act.layers.0.blocks.0"))
    assert "first divergence: layers.0.blocks.1" in str(report)
    # the same through the CLI, with the results written from the hooked twin
    results = _save(tmp_path / "r.npz", torch_results(twin, goldens["swin"]))
    code, out = _run_cli(["check", goldens["swin"], results, "--failures-only"], capsys)
    assert code == 1 and "first divergence: layers.0.blocks.1" in out
    assert "act.layers.0.blocks.0 " not in out                      # passing rows left out
    code, out = _run_cli(["check", goldens["swin"], results, "--by-module"], capsys)
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("  act ")}
    assert code == 1 and lines["layers.0.blocks.0"].split()[3] == "0"
    assert lines["layers.0.blocks.1"].endswith("<- first divergence")


def test_ganglion_sources_in_wrong_order_are_caught(goldens, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from sparx_ref.check import check_torch_module, torch_results
    from sparx_ref.torch_models import build_model
    from sparx_ref.torch_models import sparx_mamba as twin_mamba

    good = twin_mamba.SparXVSSBlock.forward

    def reversed_sources(self, x, shortcut=None, record=False):
        if isinstance(shortcut, (list, tuple)):
            shortcut = list(shortcut)[::-1]
        return good(self, x, shortcut, record)

    cfg = {k: v for k, v in model_config("sparx_mamba").items() if k != "input_shape"}
    twin = build_model("sparx_mamba", **cfg).to(torch.float64)
    monkeypatch.setattr(twin_mamba.SparXVSSBlock, "forward", reversed_sources)
    report = check_torch_module(twin, "sparx_mamba")
    # layers.1.blocks.1 is the first ganglion layer with two sources (stage input, block 0)
    assert report.first_divergence == "layers.1.blocks.1", report.format(failures_only=True)
    assert report["act.layers.1.blocks.1.op.d_proj"].status == "FAIL"
    assert report["act.layers.1.blocks.0"].passed
    # once through a real subprocess: the console entry's exit code and output
    results = _save(tmp_path / "r.npz", torch_results(twin, goldens["sparx_mamba"], grads=False))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "sparx_ref.cli", "check", str(goldens["sparx_mamba"]),
                           str(results), "--failures-only"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "first divergence: layers.1.blocks.1" in proc.stdout
    assert "gradients not checked" in proc.stdout


def test_sparx_swin_sources_in_wrong_order_are_caught(monkeypatch):
    torch = pytest.importorskip("torch")
    from sparx_ref.check import check_torch_module
    from sparx_ref.torch_models import build_model
    from sparx_ref.torch_models import sparx_swin as twin_sparx_swin

    good = twin_sparx_swin.SparXSwinBlock.mix_input
    monkeypatch.setattr(twin_sparx_swin.SparXSwinBlock, "mix_input",
                        lambda self, u, shortcut: good(self, u, None if shortcut is None else shortcut[::-1]))
    cfg = {k: v for k, v in model_config("sparx_swin").items() if k != "input_shape"}
    report = check_torch_module(build_model("sparx_swin", **cfg).to(torch.float64), "sparx_swin")
    # the first ganglion block; its DMCA's d_proj is the first tensor computed from the shortcut
    assert report.first_divergence == "layers.1.blocks.1"
    assert report.first_failure.key == "act.layers.1.blocks.1.dmca.d_proj"
    assert report["act.layers.1.blocks.0"].passed


def test_model_level_scan_bugs_are_located():
    """Scan-direction and softplus bugs inside the SparX-Mamba twin's kernels are located at
    the first block (every block scans)."""
    torch = pytest.importorskip("torch")
    import dataclasses

    from sparx_ref.check import check_torch_module
    from sparx_ref.torch_models import build_model, common

    cfg = {k: v for k, v in model_config("sparx_mamba").items() if k != "input_shape"}
    bugs = {
        "cross_scan": lambda x: common.cross_scan_torch(x)[:, [0, 3, 2, 1]],
        "selective_scan": lambda *a, delta_softplus=False: common.selective_scan_torch(*a, delta_softplus=False),
    }
    for field_name, bad in bugs.items():
        twin = build_model("sparx_mamba", **cfg).to(torch.float64)
        for mod in twin.modules():
            if hasattr(mod, "forward_ssm"):
                mod.kernels = dataclasses.replace(mod.kernels, **{field_name: bad})
        report = check_torch_module(twin, "sparx_mamba")
        assert report.first_divergence == "layers.0.blocks.0", field_name
        assert report.first_failure.key == "act.layers.0.blocks.0.op"
        assert report["act.patch_embed"].passed


# ---------------------------------------------------------------------------------------
# missing keys, wrong shapes, usage errors
# ---------------------------------------------------------------------------------------
def test_missing_keys_and_wrong_shapes_fail_clearly(goldens, tmp_path, capsys):
    g = goldens["sparx_swin"]
    good = oracle_results(g)
    manifest = load_golden(g)[0]
    broken = dict(good)
    del broken["out.logits"], broken["act.layers.1.blocks.2"], broken["grad.x"]
    broken["act.layers.0.downsample"] = good["act.layers.0.downsample"][:, :-1]
    broken["act.layers.0.blocks.0.attn_probs"] = good["act.layers.0.blocks.0.attn_probs"].copy()
    broken["act.layers.0.blocks.0.attn_probs"][1, 0, 2, 3] = np.nan
    for k in [k for k in broken if k.endswith(".attn_in")]:       # optional: may be absent
        del broken[k]
    broken["act.mystery"] = np.zeros(3)
    code, out = _run_cli(["check", g, _save(tmp_path / "r.npz", broken)], capsys)
    assert code == 1
    report = check_golden(g, broken)
    assert sorted(report.missing) == ["act.layers.1.blocks.2", "grad.x", "out.logits"]
    assert "missing: " in out and "act.layers.1.blocks.2" in out.split("missing: ")[1]
    row = report["act.layers.0.downsample"]
    assert row.status == "SHAPE" and "(2, 48, 24)" in row.note and "(2, 49, 24)" in row.note
    nan_row = report["act.layers.0.blocks.0.attn_probs"]
    assert nan_row.status == "FAIL" and nan_row.worst_index == (1, 0, 2, 3)
    assert report.first_divergence == "layers.0.blocks.0"
    assert report.unexpected == ["act.mystery"]
    assert not any(k.endswith(".attn_in") for k in report.missing)
    assert all(required_activation(k[4:]) for k in report.missing if k.startswith("act."))
    assert manifest["keys"]["act.layers.0.blocks.0.attn_in"]["required"] is False
    # outputs only (no gradients at all) is fine: gradients are then not checked
    only_fwd = {k: v for k, v in good.items() if not k.startswith("grad.")}
    code, out = _run_cli(["check", g, _save(tmp_path / "f.npz", only_fwd)], capsys)
    assert code == 0 and "gradients not checked" in out


def test_python_api_models_and_errors(rng):
    report = sparx_ref.check("swin", {"x": rng.standard_normal((1, 3, 56, 56))},
                             {"logits": np.zeros((1, 10))})
    assert not report.passed and report.first_divergence == "out.logits"
    with pytest.raises(ValueError, match="cotangent"):
        sparx_ref.check("cross_scan", {"x": rng.standard_normal((1, 2, 3, 3))}, {"xs": np.zeros(1)},
                        grads={"x": np.zeros(1)})
    with pytest.raises(ValueError, match="missing input"):
        sparx_ref.check("selective_scan", {"u": rng.standard_normal((1, 4, 3))}, {"y": np.zeros(1)})
    with pytest.raises(ValueError, match="unknown op or model"):
        sparx_ref.check("selective_scan_typo", {}, {})
    bad_shape = sparx_ref.check("cross_scan", {"x": rng.standard_normal((1, 2, 3, 3))},
                                {"xs": np.zeros((1, 4, 2, 8))})
    assert bad_shape.rows[0].status == "SHAPE" and not bad_shape.passed


def test_cli_usage_errors(tmp_path, capsys):
    assert cli.main(["golden", "no_such_op", "-o", str(tmp_path)]) == 2
    assert cli.main(["golden", "cross_scan", "--config", "{not json", "-o", str(tmp_path)]) == 2
    assert cli.main(["golden", "cross_scan", "--config", '{"colour": 1}', "-o", str(tmp_path)]) == 2
    assert cli.main(["check", str(tmp_path / "nowhere"), str(tmp_path / "r.npz")]) == 2
    capsys.readouterr()


def test_check_torch_module_options(rng):
    torch = pytest.importorskip("torch")
    from sparx_ref.check import check_torch_module
    from sparx_ref.torch_models import build_model

    cfg = {k: v for k, v in model_config("sparx_swin").items() if k != "input_shape"}
    # the module's own weights go into the oracle instead; a user-given input (batch 1)
    twin = build_model("sparx_swin", **cfg).to(torch.float64)
    own = {k: v.clone() for k, v in twin.state_dict().items()}
    report = check_torch_module(twin, "sparx_swin", load_weights=False,
                                input=torch.tensor(rng.standard_normal((1, 3, 56, 56))))
    assert report.passed and report["act.patch_embed"].shape == (1, 196, 12)
    assert all(torch.equal(own[k], v) for k, v in twin.state_dict().items())   # weights untouched
    # released key names are required; the error lists what did not match
    with pytest.raises(ValueError, match=r"released key names.*lacks 68 of the oracle's \[patch_embed"):
        check_torch_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), "swin")


def test_cli_golden_all_and_help(tmp_path, capsys):
    assert cli.main(["golden", "--help"]) == 0 and "OP_OR_MODEL" in capsys.readouterr().out
    assert cli.main(["check", "--help"]) == 0
    assert cli.main(["golden", "all", "--no-grad", "-o", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(list(OPS) + list(MINI_CONFIGS))
    manifest = json.loads((tmp_path / "swin" / "manifest.json").read_text())
    assert manifest["kind"] == "model" and not any(k.startswith("grad.") for k in manifest["results"])
    assert "cot.logits" not in manifest["keys"]
