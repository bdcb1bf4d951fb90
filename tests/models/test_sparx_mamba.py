"""SparX-Mamba: NumPy model and PyTorch twin vs the golden run of the released code, vs each
other (float64, hypothesis-drawn small configs, eval and train mode), and vs the released
key lists and parameter counts."""
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparx_ref
from sparx_ref import torch_models
from sparx_ref.checkpoint import to_numpy_state_dict, to_torch_state_dict
from sparx_ref.models import configs
from sparx_ref.testing import assert_close, rel_err
from sparx_ref.tolerances import tolerance

CONSTRUCTOR_KEYS = ("in_chans", "num_classes", "depths", "dims", "ssm_d_state", "ssm_ratio",
                    "ssm_dt_rank", "ssm_conv", "mlp_ratio", "ls_init_value", "stem_type",
                    "sr_ratio", "drop_path_rate")
DENSE_KEYS = ("dense_step", "dense_start", "max_dense_depth", "cross_stage")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def golden(request):
    data = request.config.rootpath / "tests" / "data"
    meta = json.loads((data / "golden_mini_a.json").read_text())
    with np.load(data / "golden_mini_a.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    c = meta["constructor"]
    kwargs = {k: c[k] for k in CONSTRUCTOR_KEYS}
    kwargs["dense_config"] = {k: c["dense_config"][k] for k in DENSE_KEYS}
    state = OrderedDict((k[3:], v.astype(np.float64) if v.dtype.kind == "f" else v)
                        for k, v in arrays.items() if k.startswith("sd."))
    return meta, arrays, kwargs, state


def randomize_state(state, rng, dtype=np.float64):
    """Random but well-conditioned values for every parameter and BN buffer (released init
    has zero biases and unit norms, which would hide bugs)."""
    out = OrderedDict()
    for k, v in state.items():
        if v.dtype.kind != "f":
            out[k] = v.copy()
        elif k.endswith("running_var"):
            out[k] = rng.uniform(0.5, 1.5, v.shape).astype(dtype)
        elif k.endswith("running_mean"):
            out[k] = (0.2 * rng.standard_normal(v.shape)).astype(dtype)
        elif k.endswith("A_logs"):
            out[k] = rng.uniform(-0.5, 1.0, v.shape).astype(dtype)
        elif k.endswith("dt_projs_bias"):
            dt = np.exp(rng.uniform(np.log(0.01), np.log(0.5), v.shape))
            out[k] = (dt + np.log(-np.expm1(-dt))).astype(dtype)
        elif v.ndim == 1 and (k.endswith("weight") or k.endswith("Ds")):
            out[k] = rng.uniform(0.5, 1.5, v.shape).astype(dtype)    # norm weights, D
        elif v.ndim == 1:
            out[k] = (0.1 * rng.standard_normal(v.shape)).astype(dtype)
        elif k.endswith("layerscale_1.weight") or k.endswith("layerscale_2.weight"):
            out[k] = (1 + 0.1 * rng.standard_normal(v.shape)).astype(dtype)
        else:  # weights: N(0, 1/fan_in), gentler for depthwise residual convs
            fan_in = int(np.prod(v.shape[1:]))
            scale = 0.2 if (k.endswith("pos_embed.weight") or k.endswith("dwconv.weight")) else 1.0
            out[k] = (scale * rng.standard_normal(v.shape) / np.sqrt(fan_in)).astype(dtype)
    return out


def twin_run(twin, state, x, dlogits, dtype=torch.float64, train=False):
    twin.to(dtype).train(train)  # cast first: loading float64 values into float32 would round
    twin.load_state_dict(to_torch_state_dict(state, dtype=dtype), strict=True)
    twin.record = True
    xt = torch.from_numpy(x).requires_grad_()
    logits = twin(xt)
    (logits * torch.from_numpy(dlogits)).sum().backward()
    grads = {n: p.grad for n, p in twin.named_parameters()}
    return logits.detach(), xt.grad, grads, twin.recorded


def numpy_run(model, state, x, dlogits, train=False):
    model.load_state_dict(state, strict=True)
    model.train(train)
    model.record = True
    model.zero_grad()
    logits = model.forward(x)
    dx = model.backward(dlogits)
    return logits, dx, model.grads, model.recorded


# ----------------------------------------------------------------------------- golden
def check_golden(meta, arrays, logits, dx, grads, recorded):
    dt = np.float64
    assert_close(logits, arrays["logits"], dt, "golden_out", "logits")
    assert_close(dx, arrays["dx"], dt, "golden_grad", "dx")
    names = [k[5:] for k in arrays if k.startswith("grad.")]
    assert sorted(names) == sorted(grads), "gradient names differ from the golden parameters"
    for n in names:
        assert_close(grads[n], arrays["grad." + n], dt, "golden_grad", "grad." + n)
    acts = [k for k in arrays if k.startswith("act.")]
    assert len(acts) > 30
    for k in acts:
        assert_close(recorded[k[4:]], arrays[k], dt, "golden_out", k)
    # attention maps: one per ganglion layer, rows are softmax distributions
    ganglia = [(b["stage"], b["idx"]) for b in meta["blocks"] if b["ganglion"]]
    for s, i in ganglia:
        attn = np.asarray(recorded[f"layers.{s}.blocks.{i}.op.attn"])
        d = meta["constructor"]["dims"][s]
        assert attn.shape == (2, 4, d // 4, d // 4)
        np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=0, atol=1e-12)


def test_twin_reproduces_golden(golden):
    meta, arrays, kwargs, state = golden
    twin = torch_models.build_model("sparx_mamba", **kwargs)
    assert list(twin.state_dict()) == list(state)
    logits, dx, grads, rec = twin_run(twin, state, arrays["x"].astype(np.float64), arrays["G"])
    check_golden(meta, arrays, logits, dx, grads, rec)


def test_numpy_reproduces_golden(golden):
    meta, arrays, kwargs, state = golden
    model = sparx_ref.build_model("sparx_mamba", **kwargs)
    assert list(model.state_dict()) == list(state)
    logits, dx, grads, rec = numpy_run(model, state, arrays["x"].astype(np.float64), arrays["G"])
    check_golden(meta, arrays, logits, dx, grads, rec)
    # forward_features: four stage outputs, the last one the classifier's input
    feats = model.forward_features(arrays["x"].astype(np.float64))
    assert [f.shape for f in feats] == [arrays[f"act.layers.{s}.out"].shape for s in range(4)]
    for s in range(4):
        assert_close(feats[s], arrays[f"act.layers.{s}.out"], np.float64, "golden_out")


def test_numpy_golden_float32(golden):
    """The same run in float32 stays within the float32 golden tolerances."""
    meta, arrays, kwargs, state = golden
    model = sparx_ref.build_model("sparx_mamba", dtype=np.float32, **kwargs)
    logits, dx, grads, _ = numpy_run(model, state, arrays["x"], arrays["G"].astype(np.float32))
    assert logits.dtype == np.float32 and dx.dtype == np.float32
    assert_close(logits, arrays["logits"], np.float32, "golden_out", "logits")
    assert_close(dx, arrays["dx"], np.float32, "golden_grad", "dx")


# ----------------------------------------------------------------------------- NumPy vs twin
@st.composite
def small_configs(draw):
    depths = [draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
              draw(st.integers(1, 2))]
    dims = [4 * draw(st.integers(1, 3)) * 2] + [4 * draw(st.integers(1, 4)) for _ in range(3)]
    dense = dict(dense_step=[1] + [draw(st.integers(1, 3)) for _ in range(3)],
                 dense_start=[100] + [draw(st.integers(0, 4)) for _ in range(3)],
                 max_dense_depth=[100] + [draw(st.integers(1, 3)) for _ in range(3)],
                 cross_stage=[False] + [draw(st.booleans()) for _ in range(3)])
    kwargs = dict(depths=depths, dims=dims, dense_config=dense, num_classes=draw(st.integers(2, 6)),
                  stem_type=draw(st.sampled_from(["v1", "v2"])),
                  ssm_d_state=draw(st.integers(1, 2)),
                  sr_ratio=[8, draw(st.integers(1, 4)), draw(st.integers(1, 3)), 1],
                  ls_init_value=[None, None, 1, 1] if draw(st.booleans()) else [1, None, None, 1])
    size = (draw(st.integers(17, 40)), draw(st.integers(17, 40)))
    return kwargs, size


def compare_models(kwargs, size, seed, train):
    rng = np.random.default_rng(seed)
    model = sparx_ref.build_model("sparx_mamba", seed=seed, **kwargs)
    twin = torch_models.build_model("sparx_mamba", **kwargs)
    state = randomize_state(model.state_dict(), rng)
    x = rng.standard_normal((2, 3) + size)
    dlogits = rng.standard_normal((2, kwargs["num_classes"]))
    n_logits, n_dx, n_grads, n_rec = numpy_run(model, state, x, dlogits, train=train)
    t_logits, t_dx, t_grads, t_rec = twin_run(twin, state, x, dlogits, train=train)
    dt = np.float64
    assert_close(n_logits, t_logits, dt, "model", "logits")
    assert_close(n_dx, t_dx, dt, "model", "dx")
    assert list(n_rec) == list(t_rec)
    for k in t_rec:
        assert_close(n_rec[k], t_rec[k], dt, "model", k)
    assert list(n_grads) == list(t_grads)
    scale = max(float(g.abs().max()) for g in t_grads.values())
    for k in t_grads:
        if float(t_grads[k].abs().max()) <= 1e-10 * scale:
            # analytically zero (e.g. a bias followed by a train-mode BatchNorm, which removes
            # any per-channel constant): both sides must be roundoff-small, not "relatively equal"
            assert np.abs(n_grads[k]).max() <= 1e-10 * scale, k
            continue
        assert_close(n_grads[k], t_grads[k], dt, "model", "grad." + k)
    if train:  # BatchNorm running stats, updated with the unbiased batch variance
        t_state = twin.state_dict()
        n_state = model.state_dict()
        changed = 0
        for k in t_state:
            if "running" in k:
                assert_close(n_state[k], t_state[k], dt, "model", k)
                changed += not np.array_equal(n_state[k], state[k])
            elif k.endswith("num_batches_tracked"):
                assert int(n_state[k]) == int(t_state[k]) == int(state[k]) + 1, k
        assert changed > 0
    return n_rec


@settings(max_examples=4)
@given(small_configs(), st.integers(0, 2**31 - 1))
def test_numpy_matches_twin_eval(cfg, seed):
    kwargs, size = cfg
    compare_models(kwargs, size, seed, train=False)


@settings(max_examples=3)
@given(small_configs(), st.integers(0, 2**31 - 1))
def test_numpy_matches_twin_train_mode(cfg, seed):
    kwargs, size = cfg
    compare_models(kwargs, size, seed, train=True)


def test_numpy_matches_twin_golden_config_non_square(golden):
    """The golden constructor (every ganglion feature of T: padding 1, sr 1/2/4, the cap) on a
    non-square input, with random weights and a ganglion attention record check."""
    _, _, kwargs, _ = golden
    rec = compare_models(kwargs, (72, 40), seed=7, train=False)
    assert rec["layers.2.blocks.6.op.attn"].shape == (2, 4, 5, 5)
    assert rec["layers.3.out"].shape == (2, 20, 3, 2)


def test_float32_model_matches_twin():
    kwargs = dict(depths=[1, 1, 2, 1], dims=[8, 12, 16, 20], num_classes=4,
                  dense_config=dict(dense_step=[1, 1, 1, 1], dense_start=[100, 0, 0, 0],
                                    max_dense_depth=[100, 1, 1, 1], cross_stage=[False] * 4))
    rng = np.random.default_rng(3)
    model = sparx_ref.build_model("sparx_mamba", dtype=np.float32, **kwargs)
    state = randomize_state(model.state_dict(), rng, np.float32)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    dlogits = rng.standard_normal((1, 4)).astype(np.float32)
    n_logits, n_dx, n_grads, _ = numpy_run(model, state, x, dlogits)
    twin = torch_models.build_model("sparx_mamba", **kwargs)
    t_logits, t_dx, t_grads, _ = twin_run(twin, state, x.astype(np.float64),
                                          dlogits.astype(np.float64))
    assert n_logits.dtype == np.float32
    assert_close(n_logits, t_logits, np.float32, "model", "logits")
    assert_close(n_dx, t_dx, np.float32, "model", "dx")


def test_backward_features_matches_twin():
    """Gradients flowing into every stage output (the detection/segmentation backbone view)."""
    kwargs = dict(depths=[1, 2, 2, 1], dims=[8, 8, 12, 16], num_classes=3,
                  dense_config=dict(dense_step=[1, 1, 1, 1], dense_start=[100, 1, 0, 0],
                                    max_dense_depth=[100, 2, 2, 2], cross_stage=[False] * 4))
    rng = np.random.default_rng(11)
    model = sparx_ref.build_model("sparx_mamba", **kwargs)
    state = randomize_state(model.state_dict(), rng)
    model.load_state_dict(state)
    twin = torch_models.build_model("sparx_mamba", **kwargs).double().eval()
    twin.load_state_dict(to_torch_state_dict(state))
    x = rng.standard_normal((1, 3, 48, 40))
    feats = model.forward_features(x)
    douts = [rng.standard_normal(f.shape) for f in feats]
    dx = model.backward_features(douts)
    xt = torch.from_numpy(x).requires_grad_()
    t_feats = twin.forward_features(xt)
    sum((f * torch.from_numpy(d)).sum() for f, d in zip(t_feats, douts)).backward()
    for f, tf in zip(feats, t_feats):
        assert_close(f, tf, np.float64, "model", "feature")
    assert_close(dx, xt.grad, np.float64, "model", "dx")


# ----------------------------------------------------------------------------- released layout
@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_released_keys_shapes_and_counts(variant, data_dir):
    ref = json.loads((data_dir / f"official_keys_sparx_mamba_{variant}.json").read_text())
    name = f"sparx_mamba_{variant}"
    expected = [(k, tuple(shape)) for k, shape, _ in ref["entries"]]
    model = sparx_ref.build_model(name, dtype=np.float32)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == expected
    assert model.num_parameters() == ref["total_params_trainable"] == configs.SPARX_MAMBA_PARAMS[name]
    twin = torch_models.build_model(name)
    assert [(k, tuple(v.shape)) for k, v in twin.state_dict().items()] == expected
    assert [str(v.dtype).replace("torch.", "") for v in twin.state_dict().values()] == \
        [dt for _, _, dt in ref["entries"]]
    assert sum(p.numel() for p in twin.parameters() if p.requires_grad) == ref["total_params_trainable"]
    for m in (model, twin):
        assert m.pretrained_cfg["crop_pct"] == configs.SPARX_MAMBA_RELEASE[name]["crop_pct"]
        assert m.pretrained_cfg["interpolation"] == "bicubic"


def test_released_init_statistics():
    """Spec §10 on a small model: conv/linear weights N(0, .02) truncated at +-2, biases 0,
    norms 1/0, A_logs = log(1..N), Ds = 1, dt bias = softplus^-1 of dt in [1e-3, 0.1],
    LayerScale = ls_init_value; identical rules in both implementations."""
    kwargs = dict(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], ssm_d_state=3)
    for sd in (sparx_ref.build_model("sparx_mamba", **kwargs).state_dict(),
               to_numpy_state_dict(torch_models.build_model("sparx_mamba", **kwargs).state_dict())):
        w = sd["layers.2.blocks.0.mlp.fc1.weight"]
        assert abs(w.std() - 0.02) < 0.002 and np.abs(w).max() < 0.2
        assert not sd["layers.2.blocks.0.mlp.fc1.bias"].any()
        assert np.all(sd["layers.2.blocks.0.norm.weight"] == 1)
        a = sd["layers.1.blocks.0.op.A_logs"]
        np.testing.assert_allclose(a, np.tile(np.log([1.0, 2.0, 3.0]), (a.shape[0], 1)), rtol=1e-6)
        assert np.all(sd["layers.1.blocks.0.op.Ds"] == 1)
        dt = np.log1p(np.exp(sd["layers.1.blocks.0.op.dt_projs_bias"].astype(np.float64)))
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        R = sd["layers.1.blocks.0.op.dt_projs_weight"].shape[-1]
        assert np.abs(sd["layers.1.blocks.0.op.dt_projs_weight"]).max() <= R ** -0.5
        assert np.all(sd["layers.2.blocks.1.layerscale_1.weight"] == 1)
        assert "layers.1.blocks.0.layerscale_1.weight" not in sd


def test_ganglion_in_stage_0_rejected():
    dense = dict(dense_step=[1, 1, 2, 1], dense_start=[1, 1, 0, 0], max_dense_depth=[100, 100, 3, 100],
                 cross_stage=[False] * 4)
    for build in (sparx_ref.build_model, torch_models.build_model):
        with pytest.raises(ValueError, match="stage 0"):
            build("sparx_mamba", depths=[2, 2, 2, 2], dims=[8, 8, 8, 8], dense_config=dense)


def test_bad_arguments_rejected():
    with pytest.raises(TypeError, match="unexpected keyword"):
        sparx_ref.build_model("sparx_mamba_t", depth=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="divisible by 4"):
        torch_models.build_model("sparx_mamba", dims=[8, 10, 12, 16])
    with pytest.raises(ValueError, match="kernel_backend"):
        torch_models.build_model("sparx_mamba_t", kernel_backend="cuda")
    model = sparx_ref.build_model("sparx_mamba", depths=[1, 1, 1, 1], dims=[8, 8, 8, 8])
    with pytest.raises(TypeError, match="dtype"):
        model.forward(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        model.forward(np.zeros((1, 4, 32, 32)))


def test_load_state_dict_strict_errors(rng):
    model = sparx_ref.build_model("sparx_mamba", depths=[1, 1, 1, 1], dims=[8, 8, 8, 8])
    state = OrderedDict(model.state_dict())
    missing_key = "layers.2.blocks.0.op.d_proj.3.weight"
    del state[missing_key]
    state["layers.9.extra"] = rng.standard_normal(3)
    state["classifier.3.weight"] = rng.standard_normal((5, 8))
    with pytest.raises(ValueError) as err:
        model.load_state_dict(state, strict=True)
    msg = str(err.value)
    assert missing_key in msg and "layers.9.extra" in msg and "classifier.3.weight" in msg
    assert "(1000, 8)" in msg and "(5, 8)" in msg


def test_twin_pretrained_offline_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="offline"):
        torch_models.build_model("sparx_mamba_t", pretrained=True)
    with pytest.raises(ValueError, match="no released checkpoint"):
        torch_models.build_model("sparx_mamba", depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], pretrained=True)


def test_twin_pretrained_loads_wrapped_checkpoint(monkeypatch):
    """pretrained=True goes through torch.hub; here the 'download' returns a state_dict
    wrapped as {"model": ...} built by the test itself."""
    reference = torch_models.build_model("sparx_mamba_t")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs.get("weights_only")))
        return {"model": state, "epoch": 300}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    twin = torch_models.build_model("sparx_mamba_t", pretrained=True)
    assert calls == [(configs.SPARX_MAMBA_RELEASE["sparx_mamba_t"]["url"], True)]
    key = "layers.2.blocks.0.op.q.1.weight"
    assert torch.equal(twin.state_dict()[key], state[key])



def test_drop_path_train_and_eval(rng):
    """drop_path_rate > 0: identity in eval mode (same numbers as rate 0); in train mode the
    masks are random per call, and with the masks frozen the NumPy backward matches central
    finite differences of its own forward."""
    kwargs = dict(depths=[1, 1, 2, 1], dims=[8, 8, 8, 8], num_classes=3)
    plain = sparx_ref.build_model("sparx_mamba", **kwargs)
    dropped = sparx_ref.build_model("sparx_mamba", drop_path_rate=0.6, seed=4, **kwargs)
    assert dropped.cfg["drop_path"][3][0] == pytest.approx(0.6)
    state = randomize_state(plain.state_dict(), rng)
    plain.load_state_dict(state)
    dropped.load_state_dict(state)
    x = rng.standard_normal((1, 3, 48, 48))
    np.testing.assert_array_equal(plain.eval().forward(x), dropped.eval().forward(x))
    dropped.train()
    assert len({tuple(dropped.forward(x)[0]) for _ in range(4)}) > 1

    def run(xv):  # every DropPath replays the same masks
        for _, m in dropped.named_modules():
            if type(m).__name__ == "DropPath":
                m.rng = np.random.default_rng(123)
        return dropped.forward(xv)

    dlogits = rng.standard_normal((1, 3))
    run(x)
    dropped.zero_grad()
    dx = dropped.backward(dlogits)
    eps = 1e-6
    for idx in [(0, 0, 3, 5), (0, 2, 40, 17)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd = float(((run(xp) - run(xm)) * dlogits).sum()) / (2 * eps)
        assert abs(dx[idx] - fd) <= 1e-6 * max(1.0, abs(fd)), (idx, dx[idx], fd)
