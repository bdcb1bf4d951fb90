"""DMCA: the ganglion layer's input path of SparX (dynamic multi-layer channel aggregation).

A *ganglion layer* is a block that, besides its own input ``x``, receives the outputs of
earlier layers (the ``shortcut``, concatenated along channels; see spec sparx_mamba.md §4
for which ones). Before its token mixer runs, it fuses the two in the path below
(sparx_mamba.md §7 steps 1-8; the released ``SparXSS2D.forward`` under ``is_cross_layer``).
Shapes: ``x: (B, d, H, W)`` the normed block input, ``shortcut: (B, c, H, W)``.

1. **Compress the shortcut.** ``t = d_proj(d_norm(shortcut))``, where ``d_norm`` normalises
   the *whole concatenation jointly* (GroupNorm with one group for SparX-Mamba; a per-pixel
   LayerNorm over channels for our SparX-Swin reconstruction) and
   ``d_proj = dwconv3x3 (no bias) -> BN -> GELU -> conv1x1 c->2d (bias) -> GELU``.
   ``t: (B, 2d, H, W)`` is split into the key input ``k_in = t[:, :d]`` and the value input
   ``v_in = t[:, d:]``.
2. **Project.** ``q = q(x)``, ``k = k(k_in)``: optional spatial reduction
   ``sr = dwconv(kernel r+1, stride r, padding (r+1)//2, no bias) -> BN -> GELU`` (only when
   ``sr_ratio = r > 1``), then ``conv1x1 d->d (no bias) -> BN``; each of q and k has its own
   sr module. ``q, k: (B, d, sH, sW)``. ``v = BN(conv1x1(v_in))`` keeps full resolution,
   ``v: (B, d, H, W)``.
3. **Channel attention in 4 groups.** With ``g = d/4`` and ``Ls = sH*sW``, view q and k as
   ``(B, 4, g, Ls)`` and v as ``(B, 4, g, H*W)``; per image and group
   ``attn = softmax(q k^T / sqrt(Ls)) v``. The *tokens are channels*: the attention matrix
   is ``g x g`` and says how much each channel of the group reads from every other
   channel's (full-resolution) value map; the reduced spatial positions are the feature
   axis of the dot product. ``attn: (B, d, H, W)``.
4. If ``(H, W) == (sH, sW)`` (sr = 1, or tiny maps) ``x`` is replaced by ``q``.
5. ``z = cat[x, attn, v]``: ``(B, 3d, H, W)``.
6. Channel shuffle with 3 groups (``'b (c g) h w -> b (g c) h w'``): interleaves x, attn
   and v channels so that each group of the grouped conv below sees all three sources.
7. ``in_proj = dwconv3x3 on 3d (bias) -> GELU -> conv1x1 3d->P (bias, groups=3)``,
   ``P = 3*floor(out_channels/3)``.
8. Channel padding up to ``out_channels`` (0, 1 or 2 appended mean channels).

``out_channels`` is ``Di = 2d`` in SparX-Mamba (the SSM's inner width) and ``d`` in our
SparX-Swin reconstruction (window attention's qkv takes d channels).

BatchNorm: every BN here (``d_proj.1``, ``q.0.1``, ``q.2``, ``k.0.1``, ``k.2``, ``v.1``)
follows the ``training`` flag: with ``training=True`` all of them normalise with batch
statistics (biased variance) and their updated running stats are returned in
``cache["new_running_stats"]``; with ``training=False`` (the golden files, inference) all
use the running stats. ``d_norm`` (GroupNorm/LayerNorm) is the same in both modes.

Parameters are a dict keyed by the released names *relative to the op*
(``"d_norm.weight"``, ``"d_proj.1.running_mean"``, ``"q.0.0.weight"``, ...); see
:func:`dmca_param_shapes` for the full list in state_dict order.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .._validate import as_float_array, check_divisible, check_shape
from . import layers as L

__all__ = ["dmca_attention_fwd", "dmca_attention_bwd", "dmca_fwd", "dmca_bwd",
           "dmca_param_shapes", "dmca_init_params", "ATTN_GROUPS", "SHUFFLE_GROUPS"]

ATTN_GROUPS = 4     # channel groups of the attention (step 3)
SHUFFLE_GROUPS = 3  # x / attn / v (steps 5-7)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------------------
# step 3: grouped channel attention
# ---------------------------------------------------------------------------------------
def dmca_attention_fwd(q, k, v, groups=ATTN_GROUPS):
    """Channel attention, mirrors ``F.scaled_dot_product_attention(q, k, v)`` on the
    released ``(B*groups, g, L)`` views (no mask, no dropout, default scale).

    q, k: (B, C, Ls); v: (B, C, L); C divisible by ``groups``, g = C / groups.
    Per image b and group j (channels [j*g, (j+1)*g)):
        S = q_bj k_bj^T / sqrt(Ls)      (g, g)   tokens = channels
        A = softmax(S, axis=-1)         (g, g)
        out_bj = A v_bj                 (g, L)
    out: (B, C, L); cache["attn"]: (B, groups, g, g) the maps A.
    """
    q = as_float_array("q", q, ndim=3)
    k = as_float_array("k", k, ndim=3, dtype=q.dtype)
    v = as_float_array("v", v, ndim=3, dtype=q.dtype)
    groups = L._positive_int("groups", groups)
    B, C, Ls = q.shape
    check_shape("k", k, (B, C, Ls))
    check_shape("v", v, (B, C, None))
    check_divisible("channels (q.shape[1])", C, groups, "groups")
    g, Lv = C // groups, v.shape[2]
    qg, kg, vg = (a.reshape(B, groups, g, -1) for a in (q, k, v))
    scale = 1.0 / math.sqrt(Ls)
    scores = np.matmul(qg, kg.transpose(0, 1, 3, 2)) * scale  # (B, groups, g, g)
    attn, _ = L.softmax_fwd(scores, axis=-1)
    out = np.matmul(attn, vg).reshape(B, C, Lv)
    return out, dict(qg=qg, kg=kg, vg=vg, attn=attn, scale=scale)


def dmca_attention_bwd(dout, cache):
    """Backward of :func:`dmca_attention_fwd`. dout: (B, C, L) -> {"q", "k", "v"}.

    dA = dout v^T, dv = A^T dout, dS = A * (dA - rowsum(dA * A)),
    dq = dS k * scale, dk = dS^T q * scale.
    """
    qg, kg, vg, attn, scale = (cache[n] for n in ("qg", "kg", "vg", "attn", "scale"))
    B, G, g, Lv = vg.shape
    dout = as_float_array("dout", dout, ndim=3, dtype=vg.dtype)
    check_shape("dout", dout, (B, G * g, Lv))
    dg = dout.reshape(B, G, g, Lv)
    d_attn = np.matmul(dg, vg.transpose(0, 1, 3, 2))
    dv = np.matmul(attn.transpose(0, 1, 3, 2), dg)
    d_scores = L.softmax_bwd(d_attn, {"y": attn, "axis": -1})["x"] * scale
    dq = np.matmul(d_scores, kg)
    dk = np.matmul(d_scores.transpose(0, 1, 3, 2), qg)
    C = G * g
    return {"q": dq.reshape(B, C, -1), "k": dk.reshape(B, C, -1), "v": dv.reshape(B, C, Lv)}


# ---------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------
def _bn_entries(prefix, ch):
    return [(f"{prefix}.weight", ((ch,), "param")), (f"{prefix}.bias", ((ch,), "param")),
            (f"{prefix}.running_mean", ((ch,), "buffer")),
            (f"{prefix}.running_var", ((ch,), "buffer")),
            (f"{prefix}.num_batches_tracked", ((), "buffer"))]


def _fused_channels(out_channels):
    """P = 3*floor(out_channels/3) channels leave the grouped in_proj; the rest is padding."""
    return SHUFFLE_GROUPS * (out_channels // SHUFFLE_GROUPS)


def dmca_param_shapes(dim, shortcut_channels, sr_ratio, out_channels):
    """OrderedDict key -> (shape, kind) in the released state_dict order; kind is "param"
    (trainable) or "buffer" (BN running stats, ``num_batches_tracked`` int64 shape ()).

    dim = d (divisible by 4), shortcut_channels = c, sr_ratio >= 1, out_channels >= 3.
    """
    d = L._positive_int("dim", dim)
    c = L._positive_int("shortcut_channels", shortcut_channels)
    sr = L._positive_int("sr_ratio", sr_ratio)
    out_channels = L._positive_int("out_channels", out_channels, minimum=SHUFFLE_GROUPS)
    check_divisible("dim", d, ATTN_GROUPS, "attention groups")
    P = _fused_channels(out_channels)
    check_divisible("P = 3*floor(out_channels/3)", P, SHUFFLE_GROUPS, "groups")
    e = [("d_norm.weight", ((c,), "param")), ("d_norm.bias", ((c,), "param")),
         ("d_proj.0.weight", ((c, 1, 3, 3), "param"))]
    e += _bn_entries("d_proj.1", c)
    e += [("d_proj.3.weight", ((2 * d, c, 1, 1), "param")), ("d_proj.3.bias", ((2 * d,), "param"))]
    for name in ("q", "k"):
        if sr > 1:
            e.append((f"{name}.0.0.weight", ((d, 1, sr + 1, sr + 1), "param")))
            e += _bn_entries(f"{name}.0.1", d)
        e.append((f"{name}.1.weight", ((d, d, 1, 1), "param")))
        e += _bn_entries(f"{name}.2", d)
    e.append(("v.0.weight", ((d, d, 1, 1), "param")))
    e += _bn_entries("v.1", d)
    e += [("in_proj.0.weight", ((3 * d, 1, 3, 3), "param")), ("in_proj.0.bias", ((3 * d,), "param")),
          ("in_proj.2.weight", ((P, d, 1, 1), "param")), ("in_proj.2.bias", ((P,), "param"))]
    return OrderedDict(e)


def dmca_init_params(dim, shortcut_channels, sr_ratio, out_channels, rng, dtype=np.float64):
    """The released initialisation (spec sparx_mamba.md §10): conv weights
    trunc_normal(std 0.02), conv biases 0, norm weights 1 / biases 0, running_mean 0,
    running_var 1, num_batches_tracked 0 (int64). Returns an OrderedDict in state order."""
    dtype = np.dtype(dtype)
    out = OrderedDict()
    for key, (shape, _) in dmca_param_shapes(dim, shortcut_channels, sr_ratio, out_channels).items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(0, dtype=np.int64)
        elif key.endswith("running_var"):
            out[key] = np.ones(shape, dtype=dtype)
        elif key.endswith("running_mean"):
            out[key] = np.zeros(shape, dtype=dtype)
        elif len(shape) == 4:  # a conv weight
            out[key] = L.trunc_normal(rng, shape, std=0.02, dtype=dtype)
        elif key.endswith(".bias"):
            out[key] = np.zeros(shape, dtype=dtype)
        else:  # norm weight (d_norm, BN)
            out[key] = np.ones(shape, dtype=dtype)
    return out


def _check_params(params, shapes, dtype):
    missing = [k for k in shapes if k not in params]
    unexpected = [k for k in params if k not in shapes]
    if missing or unexpected:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {unexpected}")
    for key, (shape, kind) in shapes.items():
        p = params[key]
        if key.endswith("num_batches_tracked"):
            if np.shape(p) != ():
                raise ValueError(f"params[{key!r}] must have shape (), got {np.shape(p)}")
            continue
        as_float_array(f"params[{key!r}]", p, dtype=dtype)
        check_shape(f"params[{key!r}]", p, shape)


# ---------------------------------------------------------------------------------------
# a linear chain of layer ops with its backward (one per branch: d_proj, q, k, v, in_proj)
# ---------------------------------------------------------------------------------------
class _Chain:
    """Runs layer ops in order, remembers their caches, and replays them backwards,
    mapping each parameter gradient to its released key."""

    def __init__(self, params, training, eps):
        self.params, self.training, self.eps = params, training, eps
        self.steps = []          # (backward fn, cache, {grad name: param key})
        self.new_stats = {}

    def conv(self, x, prefix, stride=1, padding=0, groups=1, bias=False):
        b = self.params[f"{prefix}.bias"] if bias else None
        out, c = L.conv2d_fwd(x, self.params[f"{prefix}.weight"], b, stride, padding, groups)
        names = {"weight": f"{prefix}.weight"} | ({"bias": f"{prefix}.bias"} if bias else {})
        self.steps.append((L.conv2d_bwd, c, names))
        return out

    def bn(self, x, prefix):
        p = self.params
        out, c = L.batch_norm2d_fwd(x, p[f"{prefix}.weight"], p[f"{prefix}.bias"],
                                    p[f"{prefix}.running_mean"], p[f"{prefix}.running_var"],
                                    training=self.training, momentum=0.1, eps=self.eps)
        if self.training:
            self.new_stats[f"{prefix}.running_mean"] = c["new_running_mean"]
            self.new_stats[f"{prefix}.running_var"] = c["new_running_var"]
            self.new_stats[f"{prefix}.num_batches_tracked"] = np.array(
                int(p[f"{prefix}.num_batches_tracked"]) + 1, dtype=np.int64)
        self.steps.append((L.batch_norm2d_bwd, c, {"weight": f"{prefix}.weight",
                                                   "bias": f"{prefix}.bias"}))
        return out

    def gelu(self, x):
        out, c = L.gelu_fwd(x)
        self.steps.append((L.gelu_bwd, c, {}))
        return out

    def backward(self, dout, grads):
        for bwd, c, names in reversed(self.steps):
            g = bwd(dout, c)
            for gname, key in names.items():
                grads[key] = g[gname]
            dout = g["x"]
        return dout


# ---------------------------------------------------------------------------------------
# the whole DMCA path
# ---------------------------------------------------------------------------------------
def dmca_fwd(x, shortcut, params, *, sr_ratio, out_channels, norm="group", training=False,
             eps=1e-5):
    """The ganglion layer's input path (module docstring, steps 1-8).

    x: (B, d, H, W) the normed block input, d divisible by 4; shortcut: (B, c, H, W);
    params: dict keyed as :func:`dmca_param_shapes` (same float dtype as x; BN buffers
    included); sr_ratio >= 1; out_channels: Di = 2d (SparX-Mamba) or d (SparX-Swin);
    norm: "group" (GroupNorm, 1 group) or "layer" (LayerNorm over channels per pixel).
    out: (B, out_channels, H, W).
    cache["attn"]: (B, 4, d/4, d/4) attention maps; cache["d_proj"]: (B, 2d, H, W);
    cache["in_proj"]: (B, P, H, W) before padding; in training
    cache["new_running_stats"]: {key: array} for every BN's running_mean, running_var and
    num_batches_tracked (+1); the params dict is not modified.
    """
    x = as_float_array("x", x, ndim=4)
    shortcut = as_float_array("shortcut", shortcut, ndim=4, dtype=x.dtype)
    B, d, H, W = x.shape
    check_shape("shortcut", shortcut, (B, None, H, W))
    c = shortcut.shape[1]
    check_divisible("dim (x.shape[1])", d, ATTN_GROUPS, "attention groups")
    if norm not in ("group", "layer"):
        raise ValueError(f"norm must be 'group' or 'layer', got {norm!r}")
    shapes = dmca_param_shapes(d, c, sr_ratio, out_channels)
    _check_params(params, shapes, x.dtype)
    sr = sr_ratio
    P = _fused_channels(out_channels)
    p = params
    cache = dict(norm=norm, sr=sr, shapes=shapes, d=d)

    # 1. d_norm over the whole concatenated shortcut, then d_proj
    if norm == "group":
        s_n, cache["d_norm"] = L.group_norm_fwd(shortcut, p["d_norm.weight"], p["d_norm.bias"], 1, eps)
    else:  # LayerNorm over channels, per pixel: move C last and back
        s_n, cache["d_norm"] = L.layer_norm_fwd(np.moveaxis(shortcut, 1, -1), p["d_norm.weight"],
                                                p["d_norm.bias"], eps)
        s_n = np.ascontiguousarray(np.moveaxis(s_n, -1, 1))
    ch_dproj = _Chain(p, training, eps)
    t = ch_dproj.conv(s_n, "d_proj.0", padding=1, groups=c)
    t = ch_dproj.gelu(ch_dproj.bn(t, "d_proj.1"))
    t = ch_dproj.gelu(ch_dproj.conv(t, "d_proj.3", bias=True))   # (B, 2d, H, W)
    k_in, v_in = t[:, :d], t[:, d:]

    # 2. q, k (with their own spatial reduction), v (full resolution)
    chains = {}
    for name, inp in (("q", x), ("k", k_in)):
        ch = chains[name] = _Chain(p, training, eps)
        if sr > 1:
            inp = ch.gelu(ch.bn(ch.conv(inp, f"{name}.0.0", stride=sr, padding=(sr + 1) // 2,
                                        groups=d), f"{name}.0.1"))
        chains[name + "_out"] = ch.bn(ch.conv(inp, f"{name}.1"), f"{name}.2")
    ch = chains["v"] = _Chain(p, training, eps)
    v = ch.bn(ch.conv(v_in, "v.0"), "v.1")                       # (B, d, H, W)
    q, k = chains["q_out"], chains["k_out"]                      # (B, d, sH, sW)
    sH, sW = q.shape[2:]

    # 3. channel attention in 4 groups
    attn, cache["attention"] = dmca_attention_fwd(q.reshape(B, d, sH * sW),
                                                  k.reshape(B, d, sH * sW),
                                                  v.reshape(B, d, H * W))
    attn = attn.reshape(B, d, H, W)

    # 4-6. x replaced by q when nothing was reduced; concat; shuffle
    replaced = (H, W) == (sH, sW)
    z = np.concatenate([q if replaced else x, attn, v], axis=1)   # (B, 3d, H, W)
    z = L.channel_shuffle(z, SHUFFLE_GROUPS)

    # 7. in_proj: dw3x3 (bias) -> GELU -> grouped 1x1 3d -> P
    ch_in = _Chain(p, training, eps)
    y = ch_in.gelu(ch_in.conv(z, "in_proj.0", padding=1, groups=3 * d, bias=True))
    y = ch_in.conv(y, "in_proj.2", groups=SHUFFLE_GROUPS, bias=True)   # (B, P, H, W)

    # 8. channel padding
    out, cache["pad"] = L.channel_padding_fwd(y, out_channels)

    cache.update(dproj_chain=ch_dproj, q_chain=chains["q"], k_chain=chains["k"],
                 v_chain=chains["v"], in_chain=ch_in, replaced=replaced,
                 attn=cache["attention"]["attn"], d_proj=t, in_proj=y, P=P,
                 x_shape=x.shape, q_shape=q.shape, dtype=x.dtype)
    if training:
        stats = {}
        for chn in (ch_dproj, chains["q"], chains["k"], chains["v"]):
            stats.update(chn.new_stats)
        cache["new_running_stats"] = {kk: stats[kk] for kk in shapes if kk in stats}
    return out, cache


def dmca_bwd(dout, cache):
    """Backward of :func:`dmca_fwd`. dout: (B, out_channels, H, W) ->
    {"x", "shortcut", every parameter key of dmca_param_shapes (not the buffers)}."""
    B, d, H, W = cache["x_shape"]
    dout = as_float_array("dout", dout, ndim=4, dtype=cache["dtype"])
    check_shape("dout", dout, (B, cache["P"] + cache["pad"]["pad"], H, W))
    grads = {}
    dy = L.channel_padding_bwd(dout, cache["pad"])["x"]
    dz = cache["in_chain"].backward(dy, grads)
    dz = L.channel_unshuffle(dz, SHUFFLE_GROUPS)                # adjoint of the shuffle
    dx_or_q, d_attn, dv = dz[:, :d], dz[:, d:2 * d], dz[:, 2 * d:]
    ga = dmca_attention_bwd(np.ascontiguousarray(d_attn).reshape(B, d, H * W), cache["attention"])
    qshape = cache["q_shape"]                                   # (B, d, sH, sW)
    dq = ga["q"].reshape(qshape)
    dk = ga["k"].reshape(qshape)
    dv = dv + ga["v"].reshape(B, d, H, W)
    if cache["replaced"]:
        dq = dq + dx_or_q
        dx = cache["q_chain"].backward(dq, grads)
    else:
        dx = dx_or_q + cache["q_chain"].backward(dq, grads)
    dk_in = cache["k_chain"].backward(dk, grads)
    dv_in = cache["v_chain"].backward(dv, grads)
    dt = np.concatenate([dk_in, dv_in], axis=1)
    ds_n = cache["dproj_chain"].backward(dt, grads)
    if cache["norm"] == "group":
        gn = L.group_norm_bwd(ds_n, cache["d_norm"])
        dshortcut = gn["x"]
    else:
        gn = L.layer_norm_bwd(np.moveaxis(ds_n, 1, -1), cache["d_norm"])
        dshortcut = np.ascontiguousarray(np.moveaxis(gn["x"], -1, 1))
    grads["d_norm.weight"], grads["d_norm.bias"] = gn["weight"], gn["bias"]
    out = {"x": np.ascontiguousarray(dx), "shortcut": dshortcut}
    for key, (_, kind) in cache["shapes"].items():
        if kind == "param":
            out[key] = grads[key]
    return out
