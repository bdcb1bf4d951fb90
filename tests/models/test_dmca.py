"""sparx_ref.models.dmca.DMCA: keys and order as released (also as a transparent child),
forward/backward equal to the functional op, train-mode buffer updates, recording."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sparx_ref.models.dmca import DMCA
from sparx_ref.models.layers import Conv2d
from sparx_ref.models.nn import Module
from sparx_ref.ref import dmca as D
from sparx_ref.testing import assert_close


class _Op(Module):
    """Stand-in for the SparXSS2D op: a raw parameter, the DMCA as "" child, then conv2d."""

    def __init__(self, rng):
        super().__init__()
        self.add_param("Ds", np.ones(3))
        self.add_child("", DMCA(8, 16, 2, 16, rng=rng))
        self.add_child("conv2d", Conv2d(16, 16, 5, padding=2, groups=16, rng=rng))


def test_keys_as_transparent_child_follow_released_layout(data_dir, rng):
    parent = Module()
    parent.add_child("op", _Op(rng))
    keys = list(parent.state_dict())
    assert keys[0] == "op.Ds" and keys[1] == "op.d_norm.weight" and keys[-2:] == ["op.conv2d.weight", "op.conv2d.bias"]
    # the same relative layout as a released ganglion op (T layers.2.blocks.0, sr 2)
    released = [k for k, _, _ in json.loads((data_dir / "official_keys_sparx_mamba_t.json").read_text())["entries"]
                if k.startswith("layers.2.blocks.0.op.")]
    rel = [k[len("layers.2.blocks.0.op."):] for k in released]
    ours = [k[len("op."):] for k in keys]
    assert rel[rel.index("d_norm.weight"):rel.index("conv2d.weight")] == ours[1:-2]


def test_state_dict_and_param_count(rng):
    m = DMCA(8, 12, 1, 16, rng=rng)
    shapes = D.dmca_param_shapes(8, 12, 1, 16)
    assert list(m.state_dict()) == list(shapes)
    assert m.num_parameters() == sum(int(np.prod(s)) for s, kind in shapes.values() if kind == "param")
    assert "q.0.0.weight" not in m.state_dict() and "q.1.weight" in m.state_dict()


@pytest.mark.parametrize("training", [False, True])
def test_module_equals_functional(training, rng):
    m = DMCA(8, 12, 2, 16, rng=rng)
    state = {k: (v if k.endswith("tracked") else v + 0.1 * rng.standard_normal(v.shape))
             for k, v in m.state_dict().items()}
    state = {k: (np.abs(v) + 0.5 if k.endswith("running_var") else v) for k, v in state.items()}
    m.load_state_dict(state)
    m.train(training)
    x, sc = rng.standard_normal((2, 8, 5, 6)), rng.standard_normal((2, 12, 5, 6))
    out = m.forward(x, sc)
    ref, cache = D.dmca_fwd(x, sc, state, sr_ratio=2, out_channels=16, training=training)
    assert_close(out, ref, "float64", "two_views", "out")
    assert set(m.recorded) == {"attn", "d_proj", "in_proj_padded"}
    assert m.recorded["attn"].shape == (2, 4, 2, 2) and m.recorded["d_proj"].shape == (2, 16, 5, 6)
    assert m._cache["attn"] is m.recorded["attn"]
    dout = rng.standard_normal(out.shape)
    dx, dsc = m.backward(dout)
    g = D.dmca_bwd(dout, cache)
    assert_close(dx, g["x"], "float64", "two_views", "dx")
    assert_close(dsc, g["shortcut"], "float64", "two_views", "dshortcut")
    for k, v in m.grads.items():
        assert_close(v, g[k], "float64", "two_views", k)
    new = m.state_dict()
    if training:
        for k, v in cache["new_running_stats"].items():
            assert np.array_equal(new[k], v), k
        assert int(new["v.1.num_batches_tracked"]) == int(state["v.1.num_batches_tracked"]) + 1
        assert not np.allclose(new["d_proj.1.running_mean"], state["d_proj.1.running_mean"])
    else:
        for k in state:
            assert np.array_equal(new[k], state[k]), k


def test_layer_norm_variant_and_float32(rng):
    m = DMCA(8, 8, 4, 8, norm="layer", dtype=np.float32, rng=rng)
    x = rng.standard_normal((1, 8, 7, 7)).astype(np.float32)
    out = m.forward(x, x.copy())
    assert out.shape == (1, 8, 7, 7) and out.dtype == np.float32
    with pytest.raises(ValueError, match="norm"):
        DMCA(8, 8, 1, 8, norm="batch")
