"""Swin: NumPy model (hand-written backward) vs the PyTorch twin (autograd) vs the golden run
of the released code; released keys, shapes and parameter counts; timm checkpoints; errors.

The helpers at the top are reused by tests/models/test_sparx_swin.py.
"""
import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

from sparx_ref import build_model
from sparx_ref.models import configs
from sparx_ref.models import swin as np_swin
from sparx_ref.testing import assert_close
from sparx_ref.torch_models import build_model as build_twin

BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "num_batches_tracked")


# ---------------------------------------------------------------------------------------
# helpers (shared with test_sparx_swin.py)
# ---------------------------------------------------------------------------------------
def random_state(model, rng):
    """Fresh random values for every float entry of ``model``'s state (fan-in scaled
    weights, non-trivial norms, biases, tables and BN statistics); int buffers kept."""
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith(BUFFER_SUFFIXES):
            state[key] = value.copy()
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, value.shape).astype(value.dtype)
        elif key.endswith("running_mean"):
            state[key] = (0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
        elif key.endswith("relative_position_bias_table"):
            state[key] = (0.5 * rng.standard_normal(value.shape)).astype(value.dtype)
        elif value.ndim >= 2:
            fan_in = int(np.prod(value.shape[1:])) if value.ndim > 2 or key.endswith("pos_embed") else value.shape[1]
            state[key] = (rng.standard_normal(value.shape) / np.sqrt(fan_in)).astype(value.dtype)
        elif key.endswith("weight"):  # norm weights
            state[key] = (1.0 + 0.2 * rng.standard_normal(value.shape)).astype(value.dtype)
        else:
            state[key] = (0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
    return state


def to_torch_state(state, drop_rebuilt=False):
    """NumPy state -> torch tensors; optionally without the buffers the models rebuild."""
    return OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items()
                       if not (drop_rebuilt and k.endswith(("relative_position_index", "attn_mask"))))


def compare_numpy_twin(family, kwargs, rng, batch=2, dtype=np.float64):
    """Build ``family`` in NumPy and torch with ``kwargs``, give both the same random weights,
    and compare buffers, logits, every recorded activation, dx and every parameter gradient
    with the ``model`` tolerance. Returns the NumPy model."""
    model = build_model(family, dtype=dtype, **kwargs)
    twin = build_twin(family, dtype=dtype, **kwargs)
    np_state, twin_state = model.state_dict(), twin.state_dict()
    assert list(np_state) == list(twin_state)
    for key, value in np_state.items():      # shapes, and buffers built independently agree
        assert tuple(value.shape) == tuple(twin_state[key].shape), key
        if key.endswith(("relative_position_index", "attn_mask")):
            np.testing.assert_array_equal(value, twin_state[key].numpy(), err_msg=key)
    state = random_state(model, rng)
    model.load_state_dict(state)
    twin.load_state_dict(to_torch_state(state, drop_rebuilt=True))   # rebuilt buffers accepted

    img = kwargs.get("img_size", 224)
    H, W = (img, img) if isinstance(img, int) else img
    x = rng.standard_normal((batch, kwargs.get("in_chans", 3), H, W)).astype(dtype)
    model.record, twin.record = True, True
    logits = model.forward(x)
    G = rng.standard_normal(logits.shape).astype(dtype)
    dx = model.backward(G)
    x_t = torch.from_numpy(x.copy()).requires_grad_(True)
    logits_t = twin(x_t)
    (logits_t * torch.from_numpy(G)).sum().backward()

    assert_close(logits, logits_t, dtype, "model", "logits")
    assert list(model.recorded) == list(twin.recorded)
    for key, value in model.recorded.items():
        assert_close(value, twin.recorded[key], dtype, "model", key)
    assert_close(dx, x_t.grad, dtype, "model", "dx")
    grads = model.grads
    named = dict(twin.named_parameters())
    assert list(grads) == list(named)
    for key, g in grads.items():
        assert named[key].grad is not None, key
        assert_close(g, named[key].grad, dtype, "model", "grad." + key)
    return model


@st.composite
def small_swin_kwargs(draw, min_stages=1, width_multiple=1):
    """Small Swin configurations the released code can run: 1-3 stages, windows 2-4 (with
    the shrink rule hit), non-square grids, shifted windows with several windows."""
    stages = draw(st.integers(min_stages, 3))
    window = draw(st.sampled_from([2, 3, 4]))
    patch = draw(st.sampled_from([1, 2, 4]))
    last_h, last_w = draw(st.sampled_from([1, 2, 3, 4, 6])), draw(st.sampled_from([1, 2, 3, 4, 6]))
    grid = (last_h * 2 ** (stages - 1), last_w * 2 ** (stages - 1))
    heads = [draw(st.sampled_from([1, 2])) for _ in range(stages)]
    embed = draw(st.sampled_from([4, 8])) * width_multiple
    kwargs = dict(img_size=(grid[0] * patch, grid[1] * patch), patch_size=patch, embed_dim=embed,
                  depths=[draw(st.integers(1, 3)) for _ in range(stages)], num_heads=heads,
                  window_size=window, mlp_ratio=draw(st.sampled_from([2.0, 4.0])),
                  num_classes=draw(st.sampled_from([0, 3, 7])), in_chans=draw(st.sampled_from([1, 3])),
                  ape=draw(st.booleans()), patch_norm=draw(st.booleans()))
    try:
        np_swin.stage_geometry(np_swin.resolve_config("swin", kwargs))
    except ValueError:
        assume(False)
    return kwargs


def golden_kwargs(meta):
    c = meta["constructor"]
    return {k: c[k] for k in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths",
                              "num_heads", "window_size", "mlp_ratio", "qkv_bias", "ape", "patch_norm",
                              "drop_path_rate")}


def to_timm_layout(state, underscore=False):
    """The released layout -> timm's (>= 0.9): PatchMerging at the start of the next stage
    (and listed there), ``head.fc.*``, no index/mask buffers; optionally ``layers_{i}``."""
    items = []
    for key, value in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        stage, order = None, 0
        if m:
            stage, order = int(m.group(1)) + 1, 0
            key = f"layers.{stage}.downsample.{m.group(2)}"
        elif (m := re.match(r"layers\.(\d+)\.", key)):
            stage, order = int(m.group(1)), 1
        key = key.replace("head.", "head.fc.") if key.startswith("head.") else key
        if underscore:
            key = re.sub(r"^layers\.(\d+)\.", r"layers_\1.", key)
        group = 1 if key.startswith("patch_embed") else 2 if stage is not None else 3
        items.append(((group, stage or 0, order), key, value))
    items.sort(key=lambda t: t[0])
    return OrderedDict((k, v) for _, k, v in items)


# ---------------------------------------------------------------------------------------
# golden run of the released code
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden(request):
    from tests.conftest import DATA
    data = dict(np.load(DATA / "golden_swin_mini_b.npz"))
    meta = json.loads((DATA / "golden_swin_mini_b.json").read_text())
    return data, meta


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_golden_swin_mini_b(golden, impl):
    data, meta = golden
    kwargs = golden_kwargs(meta)
    state = OrderedDict((k[3:], v.astype(np.float64) if v.dtype == np.float32 else v)
                        for k, v in data.items() if k.startswith("sd."))
    x = data["x"].astype(np.float64)
    if impl == "numpy":
        model = build_model("swin", **kwargs)
        own = model.state_dict()
    else:
        model = build_twin("swin", dtype=torch.float64, **kwargs)
        own = {k: v.numpy() for k, v in model.state_dict().items()}
    assert list(own) == list(state)
    for key in state:  # the rebuilt buffers equal the released ones exactly
        if key.endswith(("relative_position_index", "attn_mask")):
            np.testing.assert_array_equal(own[key], state[key], err_msg=key)
    model.record = True
    if impl == "numpy":
        model.load_state_dict(state)
        logits = model.forward(x)
        dx = model.backward(data["G"])
        grads = model.grads
    else:
        model.load_state_dict(to_torch_state(state))
        x_t = torch.from_numpy(x).requires_grad_(True)
        logits = model(x_t)
        (logits * torch.from_numpy(data["G"])).sum().backward()
        dx = x_t.grad
        grads = {k: p.grad for k, p in model.named_parameters()}
    assert_close(logits, data["logits"], np.float64, "golden_out", "logits")
    assert_close(dx, data["dx"], np.float64, "golden_grad", "dx")
    grad_keys = [k[5:] for k in data if k.startswith("grad.")]
    assert sorted(grads) == sorted(grad_keys)
    for key in grad_keys:
        assert_close(grads[key], data["grad." + key], np.float64, "golden_grad", "grad." + key)
    act_keys = [k[4:] for k in data if k.startswith("act.")]
    assert sorted(model.recorded) == sorted(act_keys)
    for key in act_keys:
        assert_close(model.recorded[key], data["act." + key], np.float64, "golden_out", "act." + key)


# ---------------------------------------------------------------------------------------
# full-size models: keys, shapes, dtypes, order and parameter counts (built, not run)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["numpy", "torch"])
@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_full_size_keys_shapes_counts(data_dir, impl, variant):
    official = json.loads((data_dir / f"official_keys_swin_{variant}.json").read_text())
    name = f"swin_{variant}"
    if impl == "numpy":
        model = build_model(name, dtype=np.float32)
        state, count = model.state_dict(), model.num_parameters()
        params = {k for k, _ in model.named_parameters()}
        dtype_name = lambda v: str(v.dtype)  # noqa: E731
    else:
        model = build_twin(name)
        state, count = model.state_dict(), sum(p.numel() for p in model.parameters())
        params = {k for k, _ in model.named_parameters()}
        dtype_name = lambda v: str(v.dtype).replace("torch.", "")  # noqa: E731
    entries = [[k, list(v.shape), dtype_name(v), "param" if k in params else "buffer"] for k, v in state.items()]
    assert entries == official["entries"]
    assert count == official["total_params_trainable"] == configs.SWIN_PARAMS[name]


def test_geometry_matches_released_blocks(data_dir):
    """Window and shift of every block (after the shrink rule) as recorded from the released code."""
    for variant in "tsb":
        official = json.loads((data_dir / f"official_keys_swin_{variant}.json").read_text())
        geometry = np_swin.stage_geometry(np_swin.resolve_config(f"swin_{variant}", {}))
        got = [(s, j, (st_["H"], st_["W"]), M, shift) for s, st_ in enumerate(geometry)
               for j, (M, shift) in enumerate(st_["blocks"])]
        want = [(b["stage"], b["idx"], tuple(b["input_resolution"]), b["window_size"], b["shift_size"])
                for b in official["blocks"]]
        assert got == want


# ---------------------------------------------------------------------------------------
# NumPy vs twin on drawn configurations
# ---------------------------------------------------------------------------------------
@given(kwargs=small_swin_kwargs(), seed=st.integers(0, 2 ** 16))
def test_numpy_matches_twin_float64(kwargs, seed):
    compare_numpy_twin("swin", kwargs, np.random.default_rng(seed))


def test_numpy_matches_twin_shifted_nonsquare(rng):
    """A fixed case that surely has shifted windows with nW > 1 on a non-square grid, a
    shrunk window in a later stage and three stages."""
    kwargs = dict(img_size=(32, 64), patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 4],
                  window_size=4, num_classes=5)
    geometry = np_swin.stage_geometry(np_swin.resolve_config("swin", kwargs))
    assert geometry[0]["blocks"][1] == (4, 2) and geometry[0]["H"] * geometry[0]["W"] // 16 == 32
    assert geometry[2]["blocks"] == [(4, 0), (4, 0)] and (geometry[2]["H"], geometry[2]["W"]) == (4, 8)
    compare_numpy_twin("swin", kwargs, rng)


def test_numpy_matches_twin_float32(rng):
    kwargs = dict(img_size=32, embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=4, num_classes=4)
    compare_numpy_twin("swin", kwargs, rng, dtype=np.float32)


# ---------------------------------------------------------------------------------------
# the shrink rule and other construction details
# ---------------------------------------------------------------------------------------
def test_shrink_rule_shapes():
    # 4 x 8 grid, window 4: min side == window -> M = 4, no shift, but two windows
    model = build_model("swin", img_size=(16, 32), embed_dim=8, depths=[2], num_heads=[2], window_size=4,
                        num_classes=3)
    state = model.state_dict()
    assert "layers.0.blocks.1.attn_mask" not in state
    assert state["layers.0.blocks.1.attn.relative_position_bias_table"].shape == (49, 2)
    # window 7 on 4 x 4 then 2 x 2 grids: M = 4 then M = 2 (table (9, heads)), never shifted
    model = build_model("swin", img_size=16, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=7,
                        num_classes=3)
    state = model.state_dict()
    assert not any(k.endswith("attn_mask") for k in state)
    assert state["layers.0.blocks.1.attn.relative_position_bias_table"].shape == (49, 2)
    assert state["layers.1.blocks.0.attn.relative_position_bias_table"].shape == (9, 2)
    assert state["layers.1.blocks.0.attn.relative_position_index"].shape == (4, 4)
    # stage 0 (8 x 8 > 7) is not divisible by 7 -> clear error instead of a reshape failure
    with pytest.raises(ValueError, match="not divisible by its window"):
        build_model("swin", img_size=32, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=6)


def test_missing_buffers_are_rebuilt(rng):
    kwargs = dict(img_size=32, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4, num_classes=3)
    model = build_model("swin", **kwargs)
    state = random_state(model, rng)
    stripped = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    assert len(stripped) < len(state)
    fresh = build_model("swin", seed=7, **kwargs)
    fresh.load_state_dict(stripped, strict=True)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    twin = build_twin("swin", dtype=torch.float64, **kwargs)
    twin.load_state_dict(to_torch_state(stripped), strict=True)
    x = rng.standard_normal((1, 3, 32, 32))
    assert_close(fresh.forward(x), twin(torch.from_numpy(x)), np.float64, "model", "logits")
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_state_dict({k: v for k, v in stripped.items() if k != "norm.bias"})


def test_released_init_statistics():
    """Released init (spec §11): Linear ~ N(0, .02^2) with zero bias, LayerNorm 1/0, the
    table ~ N(0, .02^2), the patch conv PyTorch's default U(+-1/sqrt(fan_in))."""
    for model in (build_model("swin_t", dtype=np.float32, seed=3),
                  {k: v.numpy() for k, v in build_twin("swin_t", seed=3).state_dict().items()}):
        state = model.state_dict() if hasattr(model, "state_dict") else model
        fc1 = state["layers.2.blocks.0.mlp.fc1.weight"]
        assert abs(fc1.std() - 0.02) < 0.001 and abs(fc1.mean()) < 0.001
        assert not state["layers.2.blocks.0.mlp.fc1.bias"].any()
        assert np.all(state["layers.2.blocks.0.norm1.weight"] == 1) and not state["norm.bias"].any()
        assert abs(state["layers.2.blocks.0.attn.relative_position_bias_table"].std() - 0.02) < 0.002
        conv = state["patch_embed.proj.weight"]
        bound = 1 / np.sqrt(48)
        assert np.abs(conv).max() <= bound and conv.std() > 0.8 * bound / np.sqrt(3)


def test_forward_features_and_eval_drop_path(rng):
    kwargs = dict(img_size=(16, 32), embed_dim=8, depths=[1, 2], num_heads=[2, 2], window_size=4, num_classes=3)
    plain = build_model("swin", **kwargs)
    with_dp = build_model("swin", drop_path_rate=0.5, **kwargs)
    with_dp.load_state_dict(plain.state_dict())
    x = rng.standard_normal((2, 3, 16, 32))
    feats = plain.forward_features(x)
    assert [f.shape for f in feats] == [(2, 8, 16), (2, 8, 16)]
    twin_feats = build_twin("swin", dtype=torch.float64, **kwargs)
    twin_feats.load_state_dict(to_torch_state(plain.state_dict()))
    for a, b in zip(feats, twin_feats.forward_features(torch.from_numpy(x))):
        assert_close(a, b, np.float64, "model", "stage output")
    # eval mode: drop path is the identity
    np.testing.assert_array_equal(plain.forward(x), with_dp.eval().forward(x))
    # train mode: some samples of some blocks' branches are dropped, so outputs change
    outs = [with_dp.train().forward(x) for _ in range(4)]
    assert any(not np.array_equal(o, outs[0]) for o in outs[1:])


# ---------------------------------------------------------------------------------------
# timm checkpoints
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("underscore", [False, True])
def test_timm_conversion_round_trip(rng, underscore):
    kwargs = dict(img_size=32, embed_dim=8, depths=[2, 2, 1], num_heads=[2, 2, 4], window_size=4, num_classes=5)
    model = build_model("swin", **kwargs)
    state = random_state(model, rng)
    model.load_state_dict(state)
    timm_state = to_timm_layout(state, underscore=underscore)
    assert "head.fc.weight" in timm_state and "layers.2.downsample.reduction.weight" in (
        {re.sub(r"^layers_(\d+)\.", r"layers.\1.", k) for k in timm_state})
    assert np_swin.is_timm_swin_state_dict(timm_state)
    assert np_swin.is_timm_swin_state_dict({"model": timm_state})
    assert not np_swin.is_timm_swin_state_dict(state)
    converted = np_swin.convert_timm_swin_state_dict({"state_dict": timm_state})
    expected = [k for k in state if not k.endswith(("relative_position_index", "attn_mask"))]
    assert list(converted) == expected
    for key in expected:
        np.testing.assert_array_equal(converted[key], state[key], err_msg=key)
    fresh = build_model("swin", seed=11, **kwargs)
    fresh.load_state_dict(converted, strict=True)
    x = rng.standard_normal((2, 3, 32, 32))
    np.testing.assert_array_equal(fresh.forward(x), model.forward(x))
    # torch tensors pass through untouched (the checkpoint loader hands tensors over)
    torch_converted = np_swin.convert_timm_swin_state_dict(to_torch_state(timm_state))
    twin = build_twin("swin", dtype=torch.float64, **kwargs)
    twin.load_state_dict(torch_converted, strict=True)
    assert_close(twin(torch.from_numpy(x)), model.forward(x), np.float64, "model", "logits")


def test_timm_detection_negative_cases():
    assert not np_swin.is_timm_swin_state_dict({"patch_embed.0.weight": np.zeros(1), "head.fc.weight": np.zeros(1)})
    released = build_model("swin", img_size=32, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                           window_size=4).state_dict()
    assert not np_swin.is_timm_swin_state_dict(released)
    # a released checkpoint passes through conversion unchanged (minus the rebuilt buffers)
    converted = np_swin.convert_timm_swin_state_dict(released)
    assert list(converted) == [k for k in released if not k.endswith(("relative_position_index", "attn_mask"))]


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def test_bad_input_errors():
    kwargs = dict(img_size=32, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4, num_classes=3)
    model = build_model("swin", **kwargs)
    twin = build_twin("swin", dtype=torch.float64, **kwargs)
    for shape in [(1, 3, 32, 28), (1, 3, 64, 64), (1, 1, 32, 32)]:
        with pytest.raises(ValueError, match=r"x must have shape"):
            model.forward(np.zeros(shape))
        with pytest.raises(ValueError, match=r"x must have shape"):
            twin(torch.zeros(shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="dimensions"):
        model.forward(np.zeros((3, 32, 32)))
    with pytest.raises(TypeError, match="dtype"):
        model.forward(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        model.forward([[0.0]])
    model.forward(np.ones((2, 3, 32, 32)))
    with pytest.raises(ValueError, match="dlogits"):
        model.backward(np.ones((2, 4)))


@pytest.mark.parametrize("builder", [build_model, build_twin])
def test_bad_config_errors(builder):
    with pytest.raises(TypeError, match="unknown keyword"):
        builder("swin_t", window=7)
    with pytest.raises(ValueError, match="same length"):
        builder("swin", depths=[2, 2], num_heads=[2])
    with pytest.raises(ValueError, match="not divisible by its window"):   # spec §4: 4 x 6 grid, window 4
        builder("swin", img_size=(64, 96), window_size=4)
    with pytest.raises(ValueError, match="even"):                          # spec §4: 7 x 7 before a merge
        builder("swin", img_size=56, embed_dim=12, depths=[2, 2, 2], num_heads=[2, 2, 2])
    with pytest.raises(ValueError, match="num_heads"):
        builder("swin", embed_dim=10, depths=[1], num_heads=[3], img_size=32, window_size=4)
    with pytest.raises(ValueError, match="unknown model name"):
        builder("swin_x")


def test_load_checkpoint_converts_timm_file(tmp_path, rng):
    """sparx_ref.load_checkpoint on a timm-layout .pth (wrapped in {"model": ...}) returns
    the released layout, which both implementations load strictly."""
    from sparx_ref import load_checkpoint
    kwargs = dict(img_size=32, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4, num_classes=3)
    model = build_model("swin", **kwargs)
    state = random_state(model, rng)
    path = tmp_path / "swin_timm.pth"
    torch.save({"model": to_torch_state(to_timm_layout(state))}, path)
    loaded = load_checkpoint(path)
    assert list(loaded) == [k for k in state if not k.endswith(("relative_position_index", "attn_mask"))]
    fresh = build_model("swin", seed=5, **kwargs)
    fresh.load_state_dict(loaded, strict=True)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    build_twin("swin", **kwargs).load_state_dict(to_torch_state(loaded), strict=True)


def test_backward_features_and_grad_accumulation(rng):
    """backward_features with gradients on two stage outputs vs autograd; backward
    accumulates into grads until zero_grad(), like PyTorch; astype switches the dtype."""
    kwargs = dict(img_size=32, embed_dim=8, depths=[1, 2], num_heads=[2, 2], window_size=4, num_classes=3)
    model = build_model("swin", **kwargs)
    twin = build_twin("swin", dtype=torch.float64, **kwargs)
    state = random_state(model, rng)
    model.load_state_dict(state)
    twin.load_state_dict(to_torch_state(state))
    x = rng.standard_normal((2, 3, 32, 32))
    feats = model.forward_features(x)
    douts = [rng.standard_normal(f.shape) for f in feats]
    dx = model.backward_features(douts)
    x_t = torch.from_numpy(x).requires_grad_(True)
    sum((f * torch.from_numpy(d)).sum() for f, d in zip(twin.forward_features(x_t), douts)).backward()
    assert_close(dx, x_t.grad, np.float64, "model", "dx")
    named = dict(twin.named_parameters())
    for key, g in model.grads.items():
        if named[key].grad is None:          # the final norm and head are not used
            assert key.startswith(("norm.", "head.")) and not g.any(), key
        else:
            assert_close(g, named[key].grad, np.float64, "model", key)
    first = {k: v.copy() for k, v in model.grads.items()}
    model.forward_features(x)
    model.backward_features(douts)
    for key, g in model.grads.items():
        np.testing.assert_allclose(g, 2 * first[key], rtol=1e-12, atol=0, err_msg=key)
    model.zero_grad()
    assert not any(g.any() for g in model.grads.values())
    model.astype(np.float32)
    assert model.forward(x.astype(np.float32)).dtype == np.float32


def test_numpy_swin_imports_without_torch():
    """sparx_ref.checkpoint calls the timm hooks from sparx_ref.models.swin: no torch needed."""
    import subprocess
    import sys
    code = ("import sys; import sparx_ref.models.swin, sparx_ref.models.sparx_swin; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[2]))
