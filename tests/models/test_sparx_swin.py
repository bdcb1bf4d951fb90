"""SparX-Swin (the project's reconstruction, docs/spec/sparx_swin.md): NumPy model vs the
PyTorch twin on drawn configurations with ganglion layers; with no ganglion layers it is Swin
bit for bit; keys and counts of the full-size variants; wiring; errors."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from sparx_ref import build_model
from sparx_ref.models import configs
from sparx_ref.models import sparx_swin as np_sparx_swin
from sparx_ref.models import swin as np_swin
from sparx_ref.testing import assert_close
from sparx_ref.torch_models import build_model as build_twin
from sparx_ref.torch_models import sparx_swin as twin_sparx_swin

from .test_swin import compare_numpy_twin, random_state, small_swin_kwargs, to_torch_state


@st.composite
def small_sparx_swin_kwargs(draw):
    """Small Swin configurations (>= 2 stages, widths divisible by 4) plus a dense config
    with at least one ganglion layer and a spatial reduction per stage."""
    kwargs = draw(small_swin_kwargs(min_stages=2, width_multiple=1))
    kwargs["embed_dim"] = 4 * draw(st.sampled_from([1, 2]))
    stages = len(kwargs["depths"])
    dense = dict(dense_step=[1] + [draw(st.sampled_from([1, 2])) for _ in range(stages - 1)],
                 dense_start=[100] + [draw(st.sampled_from([0, 1, 100])) for _ in range(stages - 1)],
                 max_dense_depth=[100] + [draw(st.sampled_from([1, 2, 100])) for _ in range(stages - 1)],
                 cross_stage=[False] + [draw(st.booleans()) for _ in range(stages - 1)])
    kwargs["dense_config"] = dense
    kwargs["sr_ratio"] = [draw(st.sampled_from([1, 2, 4])) for _ in range(stages)]
    try:
        cfg = np_sparx_swin.resolve_config("sparx_swin", kwargs)
        np_swin.stage_geometry(cfg)
    except ValueError:
        assume(False)
    assume(any(b.ganglion for stage in cfg["plan"] for b in stage))
    return kwargs


@settings(max_examples=10)  # ~0.5 s an example
@given(kwargs=small_sparx_swin_kwargs(), seed=st.integers(0, 2 ** 16))
def test_numpy_matches_twin_float64(kwargs, seed):
    model = compare_numpy_twin("sparx_swin", kwargs, np.random.default_rng(seed))
    for stage in model.cfg["plan"]:
        for b in stage:
            if b.ganglion:   # every ganglion block recorded its DMCA maps
                assert model.recorded[f"layers.{b.stage}.blocks.{b.idx}.dmca.attn"].shape[1:] == (
                    4, b.dim // 4, b.dim // 4)


def test_numpy_matches_twin_fixed(rng):
    """Three stages, shifted windows with nW > 1, several ganglion layers per stage with the
    max_dense_depth cap hit, sr 2 and 1 (x replaced by q), non-square input."""
    kwargs = dict(img_size=(32, 64), patch_size=2, embed_dim=8, depths=[2, 4, 2], num_heads=[2, 2, 4],
                  window_size=4, num_classes=5, sr_ratio=[8, 2, 1],
                  dense_config=dict(dense_step=[1, 1, 1], dense_start=[100, 0, 0],
                                    max_dense_depth=[100, 2, 100], cross_stage=[False] * 3))
    cfg = np_sparx_swin.resolve_config("sparx_swin", kwargs)
    assert cfg["plan"][1][3].sources == ("s1.l1", "s1.l2")   # the cap of 2 dropped s1.l0
    compare_numpy_twin("sparx_swin", kwargs, rng)


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_no_ganglion_equals_swin_bit_for_bit(rng, impl):
    """With configs.NO_GANGLION, sparx_swin_t has swin_t's keys and computes the same logits
    exactly (same weights, float32, 224x224)."""
    if impl == "numpy":
        swin = build_model("swin_t", dtype=np.float32, seed=1)
        sparx = build_model("sparx_swin_t", dtype=np.float32, seed=2, dense_config=configs.NO_GANGLION)
        run = lambda m, x: m.forward(x)  # noqa: E731
        state = swin.state_dict()
    else:
        swin = build_twin("swin_t", seed=1)
        sparx = build_twin("sparx_swin_t", seed=2, dense_config=configs.NO_GANGLION)
        run = lambda m, x: m(torch.from_numpy(x)).detach().numpy()  # noqa: E731
        state = swin.state_dict()
    assert list(sparx.state_dict()) == list(state)
    sparx.load_state_dict(state, strict=True)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_array_equal(run(sparx, x), run(swin, x))


def test_no_ganglion_equals_swin_small_float64_with_grads(rng):
    kwargs = dict(img_size=32, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4, num_classes=3)
    no_ganglion = dict(dense_step=[1, 1], dense_start=[100, 100], max_dense_depth=[100, 100],
                       cross_stage=[False, False])
    swin = build_model("swin", **kwargs)
    sparx = build_model("sparx_swin", sr_ratio=[2, 2], dense_config=no_ganglion, **kwargs)
    state = random_state(swin, rng)
    swin.load_state_dict(state)
    sparx.load_state_dict(state)
    x, G = rng.standard_normal((2, 3, 32, 32)), rng.standard_normal((2, 3))
    np.testing.assert_array_equal(sparx.forward(x), swin.forward(x))
    np.testing.assert_array_equal(sparx.backward(G), swin.backward(G))
    for key, g in swin.grads.items():
        np.testing.assert_array_equal(sparx.grads[key], g, err_msg=key)


def test_full_size_sparx_swin_t_keys_and_plan():
    """sparx_swin_t: Swin-T's keys plus ``dmca.*`` exactly in the ganglion blocks of the plan,
    in both implementations (same order and shapes), and a parameter count above Swin-T's."""
    model = build_model("sparx_swin_t", dtype=np.float32)
    twin = build_twin("sparx_swin_t")
    state, twin_state = model.state_dict(), twin.state_dict()
    assert list(state) == list(twin_state)
    assert all(tuple(v.shape) == tuple(twin_state[k].shape) for k, v in state.items())
    count = model.num_parameters()
    assert count == sum(p.numel() for p in twin.parameters()) > configs.SWIN_PARAMS["swin_t"]
    swin_keys = list(build_twin("swin_t").state_dict())
    assert [k for k in state if ".dmca." not in k] == swin_keys
    plan = model.cfg["plan"]
    ganglion = {(b.stage, b.idx): b for stage in plan for b in stage if b.ganglion}
    # dense_idx counted from the end of each stage: depths 2,2,6,2 with steps 1,1,2,1, starts 100,1,0,0
    assert sorted(ganglion) == [(1, 1), (2, 1), (2, 3), (2, 5), (3, 0), (3, 1)]
    for (s, i), b in ganglion.items():
        prefix = f"layers.{s}.blocks.{i}.dmca."
        assert state[prefix + "d_norm.weight"].shape == (b.shortcut_channels,)
        assert state[prefix + "d_proj.3.weight"].shape == (2 * b.dim, b.shortcut_channels, 1, 1)
        assert state[prefix + "in_proj.2.weight"].shape == (3 * (b.dim // 3), b.dim, 1, 1)
        sr = configs.SPARX_SWIN_DEFAULTS["sr_ratio"][s]
        assert (prefix + "q.0.0.weight" in state) == (sr > 1)
        # the dmca entries come right after the block's mlp
        keys = [k for k in state if k.startswith(f"layers.{s}.blocks.{i}.")]
        first = next(j for j, k in enumerate(keys) if ".dmca." in k)
        assert keys[first - 1].endswith("mlp.fc2.bias") and all(".dmca." in k for k in keys[first:])
    non_ganglion = [k for k in state if ".dmca." in k and tuple(map(int, k.split(".")[1:4:2])) not in ganglion]
    assert not non_ganglion


def test_gradient_reaches_every_shortcut_source(rng):
    """Each source of a ganglion block's shortcut gets gradient through the shortcut: zeroing
    the dmca.d_norm weight cuts that path and changes dx (checks the backward routing)."""
    kwargs = dict(img_size=32, embed_dim=8, depths=[1, 3], num_heads=[2, 2], window_size=4, num_classes=3,
                  sr_ratio=[1, 1], dense_config=dict(dense_step=[1, 1], dense_start=[100, 1],
                                                     max_dense_depth=[100, 100], cross_stage=[False, False]))
    model = build_model("sparx_swin", **kwargs)
    state = random_state(model, rng)
    model.load_state_dict(state)
    x, G = rng.standard_normal((1, 3, 32, 32)), rng.standard_normal((1, 3))
    model.forward(x)
    dx = model.backward(G)
    cut = dict(state)
    for key in state:
        if key.endswith("dmca.d_norm.weight") or key.endswith("dmca.d_norm.bias"):
            cut[key] = np.zeros_like(state[key])
    model.load_state_dict(cut)
    model.forward(x)
    assert np.max(np.abs(model.backward(G) - dx)) > 1e-6 * np.max(np.abs(dx))


def test_reconstruction_is_labelled():
    for module in (np_sparx_swin, twin_sparx_swin):
        assert "reconstruction" in module.__doc__ and "not the authors" in module.__doc__
    for obj in (np_sparx_swin.build, twin_sparx_swin.build, np_sparx_swin.SparXSwin):
        assert "reconstruction" in obj.__doc__


@pytest.mark.parametrize("builder", [build_model, build_twin])
def test_bad_config_errors(builder):
    base = dict(img_size=32, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4, sr_ratio=[1, 1])
    dense = dict(dense_step=[1, 1], dense_start=[100, 0], max_dense_depth=[100, 100], cross_stage=[False, False])
    with pytest.raises(ValueError, match="stage 0"):
        builder("sparx_swin", **base, dense_config=dict(dense, dense_start=[0, 0]))
    with pytest.raises(ValueError, match="divisible by 4"):
        builder("sparx_swin", **dict(base, embed_dim=5, num_heads=[1, 2]), dense_config=dense)
    with pytest.raises(ValueError, match="sr_ratio"):
        builder("sparx_swin", **dict(base, sr_ratio=[1, 1, 1]), dense_config=dense)
    with pytest.raises(TypeError, match="dense_config"):
        builder("sparx_swin", **base, dense_config=dict(dense, dense_stride=[1, 1]))
    with pytest.raises(ValueError, match="one per stage"):
        builder("sparx_swin", **base)          # the default dense config has 4 stages


def test_bad_input_errors():
    kwargs = dict(img_size=32, embed_dim=8, depths=[1, 2], num_heads=[2, 2], window_size=4, sr_ratio=[1, 2],
                  dense_config=dict(dense_step=[1, 1], dense_start=[100, 0], max_dense_depth=[100, 100]))
    model = build_model("sparx_swin", **kwargs)
    twin = build_twin("sparx_swin", dtype=torch.float64, **kwargs)
    with pytest.raises(ValueError, match="x must have shape"):
        model.forward(np.zeros((1, 3, 32, 16)))
    with pytest.raises(ValueError, match="x must have shape"):
        twin(torch.zeros((1, 3, 16, 32), dtype=torch.float64))
    twin.load_state_dict(to_torch_state(model.state_dict()))


def test_train_mode_batch_norm_numpy_matches_twin(rng):
    """Train mode (DMCA's BatchNorms use batch statistics and update their running stats;
    drop path 0): NumPy and twin agree on logits, gradients and the updated buffers."""
    kwargs = dict(img_size=32, embed_dim=8, depths=[1, 2], num_heads=[2, 2], window_size=4, num_classes=3,
                  sr_ratio=[2, 2], dense_config=dict(dense_step=[1, 1], dense_start=[100, 0],
                                                     max_dense_depth=[100, 100]))
    model = build_model("sparx_swin", **kwargs)
    twin = build_twin("sparx_swin", dtype=torch.float64, **kwargs)
    state = random_state(model, rng)
    model.load_state_dict(state)
    twin.load_state_dict(to_torch_state(state))
    model.train()
    twin.train()
    x, G = rng.standard_normal((3, 3, 32, 32)), rng.standard_normal((3, 3))
    logits = model.forward(x)
    model.backward(G)
    x_t = torch.from_numpy(x).requires_grad_(True)
    logits_t = twin(x_t)
    (logits_t * torch.from_numpy(G)).sum().backward()
    assert_close(logits, logits_t, np.float64, "model", "logits")
    named = dict(twin.named_parameters())
    for key, g in model.grads.items():
        assert_close(g, named[key].grad, np.float64, "model", key)
    twin_state = twin.state_dict()
    changed = 0
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert_close(value, twin_state[key], np.float64, "model", key)
            changed += not np.array_equal(value, state[key])
        elif key.endswith("num_batches_tracked"):
            assert int(value) == int(twin_state[key]) == int(state[key]) + 1
    assert changed > 0


def test_finite_differences_train_mode_with_drop_path(rng):
    """An oracle independent of torch: the NumPy backward of a tiny SparX-Swin in train mode
    (BN batch statistics, drop path 0.5 with the masks replayed) vs central differences of
    sum(logits * G), on a sample of input and parameter entries of every kind."""
    kwargs = dict(img_size=16, patch_size=2, embed_dim=4, depths=[2, 2], num_heads=[1, 2], window_size=2,
                  num_classes=3, sr_ratio=[2, 2], drop_path_rate=0.5,
                  dense_config=dict(dense_step=[1, 1], dense_start=[100, 0], max_dense_depth=[100, 1]))
    model = build_model("sparx_swin", **kwargs)
    model.load_state_dict(random_state(model, rng))
    model.train()
    drop_paths = [m for _, m in model.named_modules() if isinstance(m, np_swin.DropPath)]
    assert len(drop_paths) == 8
    x, G = rng.standard_normal((2, 3, 16, 16)), rng.standard_normal((2, 3))
    buffers = {k: v.copy() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}

    def loss():
        for m in drop_paths:                 # the same drop masks at every evaluation
            m.rng = np.random.default_rng(123)
        model.load_state_dict(buffers, strict=False)   # the same BN running stats too
        return float(np.sum(model.forward(x) * G))

    loss()
    assert any(m._cache is not None and not m._cache.all() for m in drop_paths)  # something was dropped
    model.zero_grad()
    dx = model.backward(G)
    grads = {k: v.copy() for k, v in model.grads.items()}
    params = dict(model.named_parameters())
    picks = [("x", x, idx) for idx in [tuple(rng.integers(0, s) for s in x.shape) for _ in range(4)]]
    for key in ("patch_embed.proj.weight", "layers.0.blocks.1.attn.relative_position_bias_table",
                "layers.0.blocks.1.attn.qkv.bias", "layers.0.downsample.reduction.weight",
                "layers.1.blocks.0.dmca.d_norm.weight", "layers.1.blocks.0.dmca.q.0.0.weight",
                "layers.1.blocks.1.dmca.d_proj.3.weight", "layers.1.blocks.1.dmca.in_proj.2.bias",
                "layers.1.blocks.1.mlp.fc1.weight", "head.bias"):
        p = params[key]
        picks.append((key, p, tuple(rng.integers(0, s) for s in p.shape)))
    eps = 1e-6
    got, want = [], []
    for key, arr, idx in picks:
        old = arr[idx]
        arr[idx] = old + eps
        plus = loss()
        arr[idx] = old - eps
        minus = loss()
        arr[idx] = old
        want.append((plus - minus) / (2 * eps))
        got.append(dx[idx] if key == "x" else grads[key][idx])
    assert_close(np.array(got), np.array(want), np.float64, "finite_diff", "sampled gradients")
