"""sparx_ref.ref.dmca: the ganglion input path vs a PyTorch composition written here, vs the
golden run of the released code, vs finite differences; parameters, float32, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparx_ref.ref import dmca as D
from sparx_ref.ref import layers as L
from sparx_ref.testing import assert_close, numerical_vjp, rel_err
from sparx_ref.tolerances import tolerance

STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _random_params(rng, d, c, sr, out_channels, dtype=np.float64):
    """Released init, then perturbed so that every parameter and buffer matters."""
    p = D.dmca_init_params(d, c, sr, out_channels, rng, dtype)
    for k, v in p.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            p[k] = rng.uniform(0.5, 1.5, v.shape).astype(dtype)
        elif len(v.shape) == 4:
            fan_in = v.shape[1] * v.shape[2] * v.shape[3]
            p[k] = (rng.standard_normal(v.shape) / np.sqrt(fan_in)).astype(dtype)
        else:
            p[k] = (v + 0.2 * rng.standard_normal(v.shape)).astype(dtype)
    return p


# ---------------------------------------------------------------------------------------
# the PyTorch composition (written from the spec, sparx_mamba.md §7)
# ---------------------------------------------------------------------------------------
def torch_dmca(x, sc, tp, *, sr, out_channels, norm, training):
    """tp: dict of tensors (buffers cloned so torch may update them in place)."""
    B, d, H, W = x.shape
    c = sc.shape[1]

    def bn(t, pre):
        return F.batch_norm(t, tp[pre + ".running_mean"], tp[pre + ".running_var"],
                            tp[pre + ".weight"], tp[pre + ".bias"], training, 0.1, 1e-5)

    if norm == "group":
        s = F.group_norm(sc, 1, tp["d_norm.weight"], tp["d_norm.bias"], 1e-5)
    else:
        s = F.layer_norm(sc.permute(0, 2, 3, 1), (c,), tp["d_norm.weight"], tp["d_norm.bias"],
                         1e-5).permute(0, 3, 1, 2)
    t = F.gelu(bn(F.conv2d(s, tp["d_proj.0.weight"], None, 1, 1, 1, c), "d_proj.1"))
    t = F.gelu(F.conv2d(t, tp["d_proj.3.weight"], tp["d_proj.3.bias"]))
    k_in, v_in = torch.chunk(t, 2, dim=1)

    def qk(a, n):
        if sr > 1:
            a = F.gelu(bn(F.conv2d(a, tp[n + ".0.0.weight"], None, sr, (sr + 1) // 2, 1, d), n + ".0.1"))
        return bn(F.conv2d(a, tp[n + ".1.weight"]), n + ".2")

    q, k = qk(x, "q"), qk(k_in, "k")
    v = bn(F.conv2d(v_in, tp["v.0.weight"]), "v.1")
    sH, sW = q.shape[2:]
    g = d // 4
    qg, kg, vg = q.reshape(-1, g, sH * sW), k.reshape(-1, g, sH * sW), v.reshape(-1, g, H * W)
    attn_map = torch.softmax(qg @ kg.transpose(1, 2) / (sH * sW) ** 0.5, dim=-1)
    attn = (attn_map @ vg).reshape(B, d, H, W)
    xx = q if (H, W) == (sH, sW) else x
    z = torch.cat([xx, attn, v], dim=1)
    z = z.reshape(B, d, 3, H, W).transpose(1, 2).reshape(B, 3 * d, H, W)  # 'b (c g) -> b (g c)'
    y = F.gelu(F.conv2d(z, tp["in_proj.0.weight"], tp["in_proj.0.bias"], 1, 1, 1, 3 * d))
    y = F.conv2d(y, tp["in_proj.2.weight"], tp["in_proj.2.bias"], groups=3)
    pad = out_channels - y.shape[1]
    if pad == 1:
        y = torch.cat([y, y.mean(dim=1, keepdim=True)], dim=1)
    elif pad == 2:
        p2 = F.adaptive_avg_pool1d(y.permute(0, 2, 3, 1).reshape(B, H * W, -1), 2)
        y = torch.cat([y, p2.reshape(B, H, W, 2).permute(0, 3, 1, 2)], dim=1)
    return y, attn_map.reshape(B, 4, g, g), t


# (d, c, sr, out_channels, H, W, norm, training); pad = out - 3*floor(out/3)
CONFIGS = [
    (8, 12, 1, 16, 4, 4, "group", False),     # sr 1: x replaced by q; pad 1
    (8, 12, 1, 16, 4, 5, "group", True),
    (8, 16, 2, 16, 5, 7, "group", False),     # odd H, W
    (8, 16, 2, 16, 6, 6, "group", True),
    (12, 24, 4, 24, 9, 7, "group", True),     # pad 0
    (12, 12, 4, 24, 8, 8, "group", False),
    (8, 8, 2, 8, 5, 5, "layer", False),       # SparX-Swin: out = d, pad 2
    (8, 8, 4, 8, 7, 9, "layer", True),
    (12, 24, 1, 12, 3, 3, "layer", True),     # pad 0, layer norm, sr 1
    (8, 16, 8, 14, 9, 9, "group", False),     # sr 8 (stage 0 config), pad 2
    (8, 16, 2, 16, 1, 1, "group", False),     # tiny map: reduced size == size -> replaced
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"d{c[0]}c{c[1]}sr{c[2]}o{c[3]}_{c[4]}x{c[5]}_{c[6]}_{'train' if c[7] else 'eval'}"
                                              for c in CONFIGS])
def test_dmca_vs_torch_autograd(cfg, rng):
    d, c, sr, outc, H, W, norm, training = cfg
    B = 2
    p = _random_params(rng, d, c, sr, outc)
    x, sc = rng.standard_normal((B, d, H, W)), rng.standard_normal((B, c, H, W))
    out, cache = D.dmca_fwd(x, sc, p, sr_ratio=sr, out_channels=outc, norm=norm, training=training)
    dout = rng.standard_normal(out.shape)
    grads = D.dmca_bwd(dout, cache)

    tp = {k: torch.tensor(v, requires_grad=not k.endswith(STAT_SUFFIXES)) for k, v in p.items()}
    tx, tsc = torch.tensor(x, requires_grad=True), torch.tensor(sc, requires_grad=True)
    t_out, t_attn, t_dproj = torch_dmca(tx, tsc, tp, sr=sr, out_channels=outc, norm=norm,
                                        training=training)
    t_out.backward(torch.tensor(dout))

    assert out.shape == (B, outc, H, W)
    assert_close(out, t_out, "float64", "autograd", "out")
    assert_close(cache["attn"], t_attn, "float64", "autograd", "attn")
    assert_close(cache["d_proj"], t_dproj, "float64", "autograd", "d_proj")
    assert_close(grads["x"], tx.grad, "float64", "autograd", "dx")
    assert_close(grads["shortcut"], tsc.grad, "float64", "autograd", "dshortcut")
    params = [k for k, (_, kind) in D.dmca_param_shapes(d, c, sr, outc).items() if kind == "param"]
    assert set(grads) == {"x", "shortcut", *params}
    for k in params:
        assert_close(grads[k], tp[k].grad, "float64", "autograd", f"d[{k}]")
    if training:  # torch updated its running-stat tensors in place
        stats = cache["new_running_stats"]
        for k in p:
            if k.endswith(("running_mean", "running_var")):
                assert_close(stats[k], tp[k], "float64", "autograd", k)
                assert not np.allclose(stats[k], p[k])
            elif k.endswith("num_batches_tracked"):
                assert int(stats[k]) == int(p[k]) + 1
    else:
        assert "new_running_stats" not in cache


@pytest.mark.parametrize("sr,training,norm,outc", [(2, False, "group", 8), (1, True, "layer", 10),
                                                   (2, True, "group", 7)])
def test_dmca_backward_vs_finite_differences(sr, training, norm, outc, rng):
    d, c, H, W = 4, 4, 3, 3 if sr == 1 else 4
    p = _random_params(rng, d, c, sr, outc)
    x, sc = rng.standard_normal((2, d, H, W)), rng.standard_normal((2, c, H, W))

    def f():
        return D.dmca_fwd(x, sc, p, sr_ratio=sr, out_channels=outc, norm=norm, training=training)[0]
    out, cache = D.dmca_fwd(x, sc, p, sr_ratio=sr, out_channels=outc, norm=norm, training=training)
    dout = rng.standard_normal(out.shape)
    grads = D.dmca_bwd(dout, cache)
    targets = {"x": x, "shortcut": sc, **{k: v for k, v in p.items() if not k.endswith(STAT_SUFFIXES)}}
    for name, arr in targets.items():
        err = rel_err(grads[name], numerical_vjp(f, arr, dout))
        assert err <= tolerance("float64", "finite_diff"), f"d[{name}]: {err:.2e}"


# ---------------------------------------------------------------------------------------
# attention core
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,C,Ls,Lv", [(2, 8, 4, 12), (1, 12, 9, 9), (3, 4, 1, 5)])
def test_attention_vs_torch_sdpa(B, C, Ls, Lv, rng):
    q, k, v = rng.standard_normal((B, C, Ls)), rng.standard_normal((B, C, Ls)), rng.standard_normal((B, C, Lv))
    out, cache = D.dmca_attention_fwd(q, k, v)
    dout = rng.standard_normal(out.shape)
    g = D.dmca_attention_bwd(dout, cache)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    gdim = C // 4  # the released views: (B*4, g, L), batch-major then group
    t_out = F.scaled_dot_product_attention(tq.reshape(-1, gdim, Ls), tk.reshape(-1, gdim, Ls),
                                           tv.reshape(-1, gdim, Lv)).reshape(B, C, Lv)
    t_out.backward(torch.tensor(dout))
    assert_close(out, t_out, "float64", "autograd", "out")
    for n, t in (("q", tq), ("k", tk), ("v", tv)):
        assert_close(g[n], t.grad, "float64", "autograd", f"d{n}")
    # the maps: rows sum to 1, explicit form
    explicit = torch.softmax(tq.reshape(B, 4, gdim, Ls) @ tk.reshape(B, 4, gdim, Ls).transpose(-1, -2)
                             / Ls ** 0.5, dim=-1)
    assert_close(cache["attn"], explicit, "float64", "autograd", "attn")
    assert np.allclose(cache["attn"].sum(-1), 1.0, atol=1e-14)


def test_attention_finite_differences(rng):
    q, k, v = rng.standard_normal((1, 8, 3)), rng.standard_normal((1, 8, 3)), rng.standard_normal((1, 8, 5))
    out, cache = D.dmca_attention_fwd(q, k, v, groups=2)
    dout = rng.standard_normal(out.shape)
    g = D.dmca_attention_bwd(dout, cache)
    for n, a in (("q", q), ("k", k), ("v", v)):
        num = numerical_vjp(lambda: D.dmca_attention_fwd(q, k, v, groups=2)[0], a, dout)
        assert rel_err(g[n], num) <= tolerance("float64", "finite_diff"), n


def test_attention_groups_do_not_mix(rng):
    q, k, v = rng.standard_normal((1, 8, 4)), rng.standard_normal((1, 8, 4)), rng.standard_normal((1, 8, 6))
    out, _ = D.dmca_attention_fwd(q, k, v)
    v2 = v.copy()
    v2[:, 2:4] += 1.0  # group 1 only
    out2, _ = D.dmca_attention_fwd(q, k, v2)
    changed = np.abs(out2 - out).max(axis=(0, 2)) > 0
    assert changed.tolist() == [False, False, True, True, False, False, False, False]


# ---------------------------------------------------------------------------------------
# against the golden run of the released code (eval mode)
# ---------------------------------------------------------------------------------------
def _golden_ganglion_blocks(data_dir):
    meta = json.loads((data_dir / "golden_mini_a.json").read_text())
    conn = json.loads((data_dir / "connectivity_sparx_mamba_t.json").read_text())
    dims = meta["constructor"]["dims"]
    for st in conn["stages"]:
        for layer in st["layers"]:
            if layer["ganglion"]:
                yield st["stage"], layer["idx"], dims[st["stage"]], layer


def test_dmca_matches_golden_released_run(data_dir):
    z = np.load(data_dir / "golden_mini_a.npz")
    act = lambda name: z[f"act.{name}"].astype(np.float64)  # noqa: E731
    n_checked = 0
    for s, i, d, layer in _golden_ganglion_blocks(data_dir):
        pre = f"layers.{s}.blocks.{i}"
        sd = lambda k: z[f"sd.{pre}.{k}"].astype(np.float64)  # noqa: E731
        x_in = act(f"layers.{s - 1}.out") if i == 0 else act(f"layers.{s}.blocks.{i - 1}")
        # block steps 1-2: x + pos_embed(x), then the block norm (GroupNorm, one group)
        pos, _ = L.conv2d_fwd(x_in, sd("pos_embed.weight"), sd("pos_embed.bias"), 1, 1, d)
        xn, _ = L.group_norm_fwd(x_in + pos, sd("norm.weight"), sd("norm.bias"), 1)
        sources = {"stage_input": act(f"layers.{s - 1}.out")}
        sc = np.concatenate([sources[n] if n in sources else act(f"layers.{s}.blocks.{n.split('.l')[1]}")
                             for n in layer["shortcut_inputs"]], axis=1)
        shapes = D.dmca_param_shapes(d, sc.shape[1], layer["sr_ratio"], 2 * d)
        params = {k: z[f"sd.{pre}.op.{k}"] for k in shapes}
        params = {k: (v if k.endswith("num_batches_tracked") else v.astype(np.float64)) for k, v in params.items()}
        out, cache = D.dmca_fwd(xn, sc, params, sr_ratio=layer["sr_ratio"], out_channels=2 * d)
        assert_close(cache["d_proj"], act(f"{pre}.op.d_proj"), "float64", "golden_out", f"{pre} d_proj")
        assert_close(out, act(f"{pre}.op.in_proj_padded"), "float64", "golden_out", f"{pre} in_proj_padded")
        n_checked += 1
    assert n_checked == 7  # T wiring: 1 + 4 + 2 ganglion layers


# ---------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------
def test_param_shapes_match_released_keys(data_dir):
    keys = json.loads((data_dir / "official_keys_sparx_mamba_t.json").read_text())["entries"]
    conn = json.loads((data_dir / "connectivity_sparx_mamba_t.json").read_text())
    dims = [st["dim"] for st in conn["stages"]]
    for st in conn["stages"]:
        for layer in st["layers"]:
            if not layer["ganglion"]:
                continue
            prefix = f"layers.{st['stage']}.blocks.{layer['idx']}.op."
            d = dims[st["stage"]]
            ours = D.dmca_param_shapes(d, layer["current_d_dim"], layer["sr_ratio"], 2 * d)
            ref = [(k[len(prefix):], tuple(s)) for k, s, _ in keys
                   if k.startswith(prefix) and k[len(prefix):] in ours]
            released = [k[len(prefix):] for k, _, _ in keys if k.startswith(prefix)]
            first, last = released.index("d_norm.weight"), released.index("in_proj.2.bias")
            assert released[first:last + 1] == list(ours), prefix   # same keys, same order
            assert ref == [(k, tuple(s)) for k, (s, _) in ours.items()], prefix


@pytest.mark.parametrize("d,c,sr", [(320, 320, 2), (320, 1280, 2), (512, 512, 1), (192, 384, 4)])
def test_param_count_closed_form(d, c, sr):
    """Spec §11: 13c + 2dc + 2d + 2(d^2 + 2d) + 2((sr+1)^2 d + 2d)[sr>1] + d^2 + 2d + 30d + Pd + P."""
    P = 3 * ((2 * d) // 3)
    shapes = D.dmca_param_shapes(d, c, sr, 2 * d)
    n = sum(int(np.prod(s)) for s, kind in shapes.values() if kind == "param")
    expected = (13 * c + 2 * d * c + 2 * d + 2 * (d * d + 2 * d)
                + (2 * ((sr + 1) ** 2 * d + 2 * d) if sr > 1 else 0)
                + d * d + 2 * d + 30 * d + P * d + P)
    assert n == expected


def test_init_params_released_rule(rng):
    p = D.dmca_init_params(64, 128, 2, 128, rng, np.float32)
    assert list(p) == list(D.dmca_param_shapes(64, 128, 2, 128))
    assert p["q.1.weight"].dtype == np.float32 and abs(p["q.1.weight"].std() - 0.02) < 0.003
    assert np.all(p["d_proj.3.bias"] == 0) and np.all(p["in_proj.0.bias"] == 0)
    assert np.all(p["d_norm.weight"] == 1) and np.all(p["v.1.weight"] == 1) and np.all(p["v.1.bias"] == 0)
    assert np.all(p["q.2.running_mean"] == 0) and np.all(p["q.2.running_var"] == 1)
    assert p["k.0.1.num_batches_tracked"].dtype == np.int64 and p["k.0.1.num_batches_tracked"].shape == ()
    assert "q.0.0.weight" not in D.dmca_init_params(64, 128, 1, 128, rng)


def test_float32_accepted(rng):
    d, c, sr, outc = 8, 12, 2, 16
    p64 = _random_params(rng, d, c, sr, outc)
    p32 = {k: (v if k.endswith("num_batches_tracked") else v.astype(np.float32)) for k, v in p64.items()}
    x, sc = rng.standard_normal((2, d, 6, 5)), rng.standard_normal((2, c, 6, 5))
    o64, c64 = D.dmca_fwd(x, sc, p64, sr_ratio=sr, out_channels=outc)
    o32, c32 = D.dmca_fwd(x.astype(np.float32), sc.astype(np.float32), p32, sr_ratio=sr, out_channels=outc)
    assert o32.dtype == np.float32 and c32["attn"].dtype == np.float32
    assert_close(o32, o64, "float32", "autograd", "out")
    dout = rng.standard_normal(o64.shape)
    g64, g32 = D.dmca_bwd(dout, c64), D.dmca_bwd(dout.astype(np.float32), c32)
    for k in g64:
        assert g32[k].dtype == np.float32, k
        assert_close(g32[k], g64[k], "float32", "autograd", k)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def _bad(rng, **change):
    d, c, sr, outc = 8, 12, 2, 16
    args = dict(x=rng.standard_normal((2, d, 4, 4)), shortcut=rng.standard_normal((2, c, 4, 4)),
                params=_random_params(rng, d, c, sr, outc), sr_ratio=sr, out_channels=outc)
    args.update(change)
    return args


@pytest.mark.parametrize("what,make,exc,word", [
    ("x rank", lambda r: dict(x=r.standard_normal((2, 8, 16))), ValueError, "x"),
    ("dim not /4", lambda r: dict(x=r.standard_normal((2, 6, 4, 4))), ValueError, "dim"),
    ("shortcut size", lambda r: dict(shortcut=r.standard_normal((2, 12, 4, 5))), ValueError, "shortcut"),
    ("shortcut dtype", lambda r: dict(shortcut=r.standard_normal((2, 12, 4, 4)).astype(np.float32)), TypeError, "shortcut"),
    ("shortcut channels vs d_norm", lambda r: dict(shortcut=r.standard_normal((2, 16, 4, 4))), ValueError, "d_norm"),
    ("missing key", lambda r: dict(params={k: v for k, v in _random_params(r, 8, 12, 2, 16).items() if k != "v.0.weight"}),
     ValueError, "v.0.weight"),
    ("sr mismatch", lambda r: dict(sr_ratio=1), ValueError, "q.0.0.weight"),
    ("out_channels", lambda r: dict(out_channels=2), ValueError, "out_channels"),
    ("param dtype", lambda r: dict(params={k: (v.astype(np.float32) if k == "q.1.weight" else v)
                                           for k, v in _random_params(r, 8, 12, 2, 16).items()}), TypeError, "q.1.weight"),
])
def test_bad_input_names_the_argument(what, make, exc, word, rng):
    with pytest.raises(exc, match=word.replace(".", r"\.")):
        D.dmca_fwd(**_bad(rng, **make(rng)))


def test_bad_norm_and_groups(rng):
    with pytest.raises(ValueError, match="norm"):
        D.dmca_fwd(**_bad(rng), norm="batch")
    with pytest.raises(ValueError, match="groups"):
        D.dmca_attention_fwd(rng.standard_normal((1, 6, 2)), rng.standard_normal((1, 6, 2)),
                             rng.standard_normal((1, 6, 3)), groups=4)
    with pytest.raises(ValueError, match="k"):
        D.dmca_attention_fwd(rng.standard_normal((1, 8, 2)), rng.standard_normal((1, 8, 3)),
                             rng.standard_normal((1, 8, 3)))
