"""The public ops that ``sparx-ref golden`` / ``sparx-ref check`` know, as uniform specs.

Every op is described by an :class:`OpSpec`: its default configuration (sizes for the test
vectors plus the semantic options such as ``delta_softplus``), how to draw well-conditioned
random inputs, and how to run the oracle: ``forward(inputs, config, impl) -> (outputs,
cache)`` and ``backward(cotangents, cache, impl) -> grads``, where ``impl`` maps the reference
function names (``"selective_scan_fwd"``, ...) to the functions to call, so a registered
kernel (same signature, same semantics) can stand in for the oracle.

Gradients are those of ``sum_o sum(out_o * cot_o)`` with respect to every differentiable
input (the cotangent ``cot_o`` is stored next to the outputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..ref import dmca as ref_dmca
from ..ref import scan as ref_scan
from ..ref import ss2d as ref_ss2d
from ..ref import window_attention as ref_wa


@dataclass(frozen=True)
class OpSpec:
    name: str
    summary: str                    # one line: what the op computes
    upstream: str                   # the function(s) it mirrors
    defaults: dict                  # sizes of the test vectors + semantic options
    semantic: tuple                 # config keys that change the maths (not only sizes)
    inputs: dict                    # input key -> doc (shapes)
    outputs: dict                   # output key -> doc
    differentiable: tuple           # inputs that receive a gradient
    functions: tuple                # reference function names an implementation replaces
    optional: tuple = ()            # inputs that may be absent (None)
    make_inputs: Callable = field(repr=False, default=None)
    forward: Callable = field(repr=False, default=None)
    backward: Callable = field(repr=False, default=None)

    def reference_functions(self) -> dict:
        mods = (ref_scan, ref_ss2d, ref_wa, ref_dmca)
        return {f: next(getattr(m, f) for m in mods if hasattr(m, f)) for f in self.functions}

    def run(self, inputs: dict, config: dict, cotangents: dict | None = None, impl: dict | None = None):
        """Run the op (the oracle, or ``impl`` where given). Returns (outputs, grads or None)."""
        fns = self.reference_functions()
        fns.update(impl or {})
        outputs, cache = self.forward(inputs, config, fns)
        if cotangents is None:
            return outputs, None
        grads = self.backward(cotangents, cache, fns)
        return outputs, {k: grads[k] for k in self.differentiable if grads.get(k) is not None}


def _softplus_inverse(y):
    return y + np.log(-np.expm1(-y))


# ---------------------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------------------
def _scan_inputs(cfg, rng, batch_shape, KD, K, N, L):
    """u, delta, A, B, C, D, delta_bias for a scan of KD channels in K groups, length L."""
    b = cfg["batch"]
    if cfg["delta_softplus"]:
        delta = rng.normal(-0.5, 1.0, (b, KD, L))        # raw: softplus makes it positive
    else:
        delta = rng.uniform(0.05, 1.0, (b, KD, L))       # used as is: must be positive
    inputs = dict(
        delta=delta,
        A=-np.exp(rng.uniform(-1.0, 0.7, (KD, N))),      # negative: decaying states
        B=rng.standard_normal((b, K, N, L)),
        C=rng.standard_normal((b, K, N, L)),
        D=rng.uniform(0.5, 1.5, KD) if cfg["D"] else None,
        delta_bias=(rng.normal(0.0, 0.5, KD) if cfg["delta_softplus"] else rng.uniform(0.0, 0.2, KD))
        if cfg["delta_bias"] else None,
    )
    inputs[batch_shape[0]] = rng.standard_normal(batch_shape[1])
    return inputs


def _selective_scan_inputs(cfg, rng):
    return _scan_inputs(cfg, rng, ("u", (cfg["batch"], cfg["KD"], cfg["L"])), cfg["KD"], cfg["K"],
                        cfg["N"], cfg["L"])


def _selective_scan_forward(x, cfg, fns):
    y, cache = fns["selective_scan_fwd"](x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"),
                                         x.get("delta_bias"), bool(cfg["delta_softplus"]))
    return {"y": y}, cache


def _selective_scan_backward(cot, cache, fns):
    return fns["selective_scan_bwd"](cot["y"], cache)


_SCAN_DOC = dict(
    delta="(batch, KD, L) time steps before delta_bias/softplus",
    A="(KD, N) state matrix diagonal (negative)",
    B="(batch, K, N, L) input projections, channel c uses group c // (KD/K)",
    C="(batch, K, N, L) output projections",
    D="(KD,) skip weight (optional)",
    delta_bias="(KD,) added to delta before softplus (optional)",
)

# ---------------------------------------------------------------------------------------
# cross scan / cross merge
# ---------------------------------------------------------------------------------------
def _cross_scan_forward(x, cfg, fns):
    return {"xs": fns["cross_scan"](x["x"])}, x["x"].shape


def _cross_scan_backward(cot, shape, fns):
    return {"x": fns["cross_merge"](cot["xs"], shape[2], shape[3])}


def _cross_merge_forward(x, cfg, fns):
    return {"y": fns["cross_merge"](x["ys"], int(cfg["H"]), int(cfg["W"]))}, None


def _cross_merge_backward(cot, cache, fns):
    return {"ys": fns["cross_scan"](cot["y"])}


# ---------------------------------------------------------------------------------------
# ss2d scan and forward_ssm
# ---------------------------------------------------------------------------------------
def _ss2d_inputs(cfg, rng):
    Di, L = cfg["Di"], cfg["H"] * cfg["W"]
    return _scan_inputs(cfg, rng, ("x", (cfg["batch"], Di, cfg["H"], cfg["W"])), 4 * Di, 4,
                        cfg["N"], L)


def _ss2d_forward(x, cfg, fns):
    y, cache = fns["ss2d_scan_fwd"](x["x"], x["delta"], x["A"], x["B"], x["C"], x.get("D"),
                                    x.get("delta_bias"), bool(cfg["delta_softplus"]))
    return {"y": y}, cache


def _ss2d_backward(cot, cache, fns):
    return fns["ss2d_scan_bwd"](cot["y"], cache)


def _forward_ssm_inputs(cfg, rng):
    b, Di, N, R, H, W = (cfg[k] for k in ("batch", "Di", "d_state", "dt_rank", "H", "W"))
    K = 4
    return {
        "u": rng.standard_normal((b, Di, H, W)),
        "x_proj_weight": rng.normal(0.0, 1.0 / math.sqrt(Di), (K * (R + 2 * N), Di, 1)),
        "dt_projs_weight": rng.uniform(-1.0, 1.0, (K, Di, R)) / math.sqrt(R),
        "dt_projs_bias": _softplus_inverse(np.exp(rng.uniform(np.log(0.01), np.log(0.5), (K, Di)))),
        "A_logs": rng.uniform(-0.5, 1.0, (K * Di, N)),
        "Ds": rng.uniform(0.5, 1.5, K * Di),
        "out_norm.weight": rng.normal(1.0, 0.2, Di),
        "out_norm.bias": rng.normal(0.0, 0.1, Di),
    }


def _forward_ssm_forward(x, cfg, fns):
    params = {k: x[k] for k in ref_ss2d.FORWARD_SSM_PARAM_KEYS}
    N, R = x["A_logs"].shape[1], x["dt_projs_weight"].shape[2]
    out, cache = fns["forward_ssm_fwd"](x["u"], params, d_state=N, dt_rank=R, eps=float(cfg["eps"]))
    return {"out": out}, cache


def _forward_ssm_backward(cot, cache, fns):
    return fns["forward_ssm_bwd"](cot["out"], cache)


# ---------------------------------------------------------------------------------------
# window attention (the core) and DMCA channel attention
# ---------------------------------------------------------------------------------------
def _window_attention_inputs(cfg, rng):
    H, W, M, s = cfg["H"], cfg["W"], cfg["window"], cfg["shift"]
    nW, N = (H // M) * (W // M), M * M
    Bw, heads, hd = cfg["batch"] * nW, cfg["heads"], cfg["head_dim"]
    x = {k: rng.standard_normal((Bw, heads, N, hd)) for k in ("q", "k", "v")}
    x["bias"] = rng.normal(0.0, 0.5, (heads, N, N))
    x["mask"] = ref_wa.shifted_window_mask(H, W, M, s) if s > 0 else None
    return x


def _window_attention_forward(x, cfg, fns):
    out, cache = fns["window_attention_fwd"](x["q"], x["k"], x["v"], x["bias"], x.get("mask"),
                                             cfg.get("scale"))
    return {"out": out}, cache


def _window_attention_backward(cot, cache, fns):
    return fns["window_attention_bwd"](cot["out"], cache)


def _dmca_attention_inputs(cfg, rng):
    b, C, Ls, L = cfg["batch"], cfg["C"], cfg["Ls"], cfg["L"]
    return {"q": rng.standard_normal((b, C, Ls)), "k": rng.standard_normal((b, C, Ls)),
            "v": rng.standard_normal((b, C, L))}


def _dmca_attention_forward(x, cfg, fns):
    out, cache = fns["dmca_attention_fwd"](x["q"], x["k"], x["v"], int(cfg["groups"]))
    return {"out": out}, cache


def _dmca_attention_backward(cot, cache, fns):
    return fns["dmca_attention_bwd"](cot["out"], cache)


def _window_msa_inputs(cfg, rng):
    H, W, M, s, C, heads = (cfg[k] for k in ("H", "W", "window", "shift", "C", "heads"))
    return {
        "x": rng.standard_normal((cfg["batch"], H * W, C)),
        "qkv.weight": rng.normal(0.0, 1.0 / math.sqrt(C), (3 * C, C)),
        "qkv.bias": rng.normal(0.0, 0.1, 3 * C),
        "proj.weight": rng.normal(0.0, 1.0 / math.sqrt(C), (C, C)),
        "proj.bias": rng.normal(0.0, 0.1, C),
        "relative_position_bias_table": rng.normal(0.0, 0.5, ((2 * M - 1) ** 2, heads)),
        "mask": ref_wa.shifted_window_mask(H, W, M, s) if s > 0 else None,
    }


def _window_msa_forward(x, cfg, fns):
    params = {k: x[k] for k in ref_wa.WINDOW_MSA_PARAM_KEYS}
    out, cache = fns["window_msa_fwd"](x["x"], params, H=int(cfg["H"]), W=int(cfg["W"]),
                                       num_heads=int(cfg["heads"]), window_size=int(cfg["window"]),
                                       shift_size=int(cfg["shift"]), mask=x.get("mask"))
    return {"out": out}, cache


def _window_msa_backward(cot, cache, fns):
    return fns["window_msa_bwd"](cot["out"], cache)


def _dmca_shapes(cfg):
    return ref_dmca.dmca_param_shapes(cfg["dim"], cfg["shortcut_channels"], cfg["sr_ratio"],
                                      cfg["out_channels"])


def _dmca_inputs(cfg, rng):
    b, d, c, H, W = (cfg[k] for k in ("batch", "dim", "shortcut_channels", "H", "W"))
    x = {"x": rng.standard_normal((b, d, H, W)), "shortcut": rng.standard_normal((b, c, H, W))}
    for key, (shape, _) in _dmca_shapes(cfg).items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            x[key] = np.array(0, dtype=np.int64)
        elif leaf == "running_mean":
            x[key] = rng.normal(0.0, 0.2, shape)
        elif leaf == "running_var":
            x[key] = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bias":
            x[key] = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 1:                                  # norm weights
            x[key] = rng.normal(1.0, 0.2, shape)
        else:                                                  # conv weights
            x[key] = rng.normal(0.0, 1.0 / math.sqrt(int(np.prod(shape[1:]))), shape)
    return x


def _dmca_forward(x, cfg, fns):
    params = {k: v for k, v in x.items() if k not in ("x", "shortcut") and v is not None}
    out, cache = fns["dmca_fwd"](x["x"], x["shortcut"], params, sr_ratio=int(cfg["sr_ratio"]),
                                 out_channels=int(cfg["out_channels"]), norm=cfg["norm"])
    return {"out": out}, cache


def _dmca_backward(cot, cache, fns):
    return fns["dmca_bwd"](cot["out"], cache)


_SCAN_DEFAULTS = dict(batch=2, N=2, D=True, delta_bias=True, delta_softplus=True)

OPS: dict[str, OpSpec] = {}


def _register(spec: OpSpec) -> None:
    OPS[spec.name] = spec


_register(OpSpec(
    name="selective_scan",
    summary="Mamba's selective scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t.h_t + D u_t, "
            "dt = softplus(delta + delta_bias) if delta_softplus",
    upstream="mamba_ssm selective_scan_ref (grouped B/C, as VMamba calls it); sparx_ref.ref.scan",
    defaults=dict(_SCAN_DEFAULTS, KD=8, K=4, N=3, L=19),
    semantic=("delta_softplus",),
    inputs=dict(u="(batch, KD, L) input sequence", **_SCAN_DOC),
    outputs=dict(y="(batch, KD, L)"),
    differentiable=("u", "delta", "A", "B", "C", "D", "delta_bias"),
    functions=("selective_scan_fwd", "selective_scan_bwd"), optional=("D", "delta_bias"),
    make_inputs=_selective_scan_inputs, forward=_selective_scan_forward,
    backward=_selective_scan_backward))

_register(OpSpec(
    name="cross_scan",
    summary="read a map in 4 directions: xs[:,0] row-major (h*W+w), xs[:,1] column-major (w*H+h), "
            "xs[:,2], xs[:,3] = xs[:,0], xs[:,1] reversed along L",
    upstream="VMamba CrossScan.forward; sparx_ref.ref.ss2d.cross_scan",
    defaults=dict(batch=2, C=3, H=4, W=5),
    semantic=(),
    inputs=dict(x="(batch, C, H, W)"),
    outputs=dict(xs="(batch, 4, C, H*W); index 1 is the direction"),
    differentiable=("x",),
    functions=("cross_scan", "cross_merge"),
    make_inputs=lambda cfg, rng: {"x": rng.standard_normal((cfg["batch"], cfg["C"], cfg["H"], cfg["W"]))},
    forward=_cross_scan_forward, backward=_cross_scan_backward))

_register(OpSpec(
    name="cross_merge",
    summary="add 4 directional sequences back onto the map (the adjoint of cross_scan)",
    upstream="VMamba CrossMerge.forward; sparx_ref.ref.ss2d.cross_merge",
    defaults=dict(batch=2, C=3, H=4, W=5),
    semantic=("H", "W"),
    inputs=dict(ys="(batch, 4, C, H*W)"),
    outputs=dict(y="(batch, C, H, W)"),
    differentiable=("ys",),
    functions=("cross_scan", "cross_merge"),
    make_inputs=lambda cfg, rng: {"ys": rng.standard_normal((cfg["batch"], 4, cfg["C"], cfg["H"] * cfg["W"]))},
    forward=_cross_merge_forward, backward=_cross_merge_backward))

_register(OpSpec(
    name="ss2d_scan",
    summary="y = cross_merge(selective_scan(cross_scan(x) as (batch, 4*Di, L), delta, A, B, C, D, "
            "delta_bias, delta_softplus), H, W)",
    upstream="VMamba cross_selective_scan core; sparx_ref.ref.ss2d.ss2d_scan_fwd",
    defaults=dict(_SCAN_DEFAULTS, Di=3, H=3, W=4),
    semantic=("delta_softplus",),
    inputs=dict(x="(batch, Di, H, W) map to scan",
                delta="(batch, 4*Di, H*W) time steps in scan order (channel k*Di + c: channel c, direction k)",
                A="(4*Di, N) state matrix diagonal (negative)",
                B="(batch, 4, N, H*W) input projections per direction, in scan order",
                C="(batch, 4, N, H*W) output projections per direction, in scan order",
                D="(4*Di,) skip weight (optional)", delta_bias="(4*Di,) (optional)"),
    outputs=dict(y="(batch, Di, H, W)"),
    differentiable=("x", "delta", "A", "B", "C", "D", "delta_bias"),
    functions=("ss2d_scan_fwd", "ss2d_scan_bwd"), optional=("D", "delta_bias"),
    make_inputs=_ss2d_inputs, forward=_ss2d_forward, backward=_ss2d_backward))

_register(OpSpec(
    name="forward_ssm",
    summary="SparX-Mamba's SparXSS2D.forward_ssm: cross scan, x_proj, dt_projs, selective scan "
            "(softplus, A = -exp(A_logs)), cross merge, out_norm (GroupNorm, 1 group)",
    upstream="LMMMEng/SparX SparXSS2D.forward_ssm; sparx_ref.ref.ss2d.forward_ssm_fwd",
    defaults=dict(batch=2, Di=6, d_state=2, dt_rank=2, H=3, W=4, eps=1e-5),
    semantic=("eps",),
    inputs={"u": "(batch, Di, H, W)", "x_proj_weight": "(4*(R+2N), Di, 1)",
            "dt_projs_weight": "(4, Di, R)", "dt_projs_bias": "(4, Di)", "A_logs": "(4*Di, N)",
            "Ds": "(4*Di,)", "out_norm.weight": "(Di,)", "out_norm.bias": "(Di,)"},
    outputs=dict(out="(batch, Di, H, W) after out_norm"),
    differentiable=("u",) + tuple(ref_ss2d.FORWARD_SSM_PARAM_KEYS),
    functions=("forward_ssm_fwd", "forward_ssm_bwd"),
    make_inputs=_forward_ssm_inputs, forward=_forward_ssm_forward, backward=_forward_ssm_backward))

_register(OpSpec(
    name="window_attention",
    summary="Swin's attention inside every window: softmax(scale q k^T + bias (+ mask[w])) v, "
            "scale = head_dim**-0.5, mask of 0/-100 added per window w of each image",
    upstream="microsoft/Swin-Transformer WindowAttention.forward (from q, k, v on); "
             "sparx_ref.ref.window_attention.window_attention_fwd",
    defaults=dict(batch=2, H=6, W=6, window=3, shift=1, heads=2, head_dim=4, scale=None),
    semantic=("scale",),
    inputs=dict(q="(batch*nW, heads, N, head_dim), windows batch-major", k="like q", v="like q",
                bias="(heads, N, N) relative position bias", mask="(nW, N, N) of 0/-100 (no gradient)"),
    outputs=dict(out="(batch*nW, heads, N, head_dim)"),
    differentiable=("q", "k", "v", "bias"),
    functions=("window_attention_fwd", "window_attention_bwd"), optional=("mask",),
    make_inputs=_window_attention_inputs, forward=_window_attention_forward,
    backward=_window_attention_backward))

_register(OpSpec(
    name="dmca_attention",
    summary="SparX's channel attention in groups: per image and group of g = C/groups channels, "
            "softmax(q_g k_g^T / sqrt(Ls)) v_g (tokens are channels)",
    upstream="F.scaled_dot_product_attention on the released (B*groups, g, L) views; "
             "sparx_ref.ref.dmca.dmca_attention_fwd",
    defaults=dict(batch=2, C=8, groups=4, Ls=4, L=16),
    semantic=("groups",),
    inputs=dict(q="(batch, C, Ls)", k="(batch, C, Ls)", v="(batch, C, L)"),
    outputs=dict(out="(batch, C, L)"),
    differentiable=("q", "k", "v"),
    functions=("dmca_attention_fwd", "dmca_attention_bwd"),
    make_inputs=_dmca_attention_inputs, forward=_dmca_attention_forward,
    backward=_dmca_attention_backward))

_register(OpSpec(
    name="window_msa",
    summary="Swin's whole (S)W-MSA branch on norm1(x): roll by -shift, window partition, qkv, "
            "window attention with relative position bias (+ mask), proj, window reverse, roll by +shift",
    upstream="microsoft/Swin-Transformer SwinTransformerBlock.forward (attention branch); "
             "sparx_ref.ref.window_attention.window_msa_fwd",
    defaults=dict(batch=2, H=6, W=6, window=3, shift=1, heads=2, C=8),
    semantic=("H", "W", "window", "shift", "heads"),
    inputs={"x": "(batch, H*W, C) tokens (row-major), the output of norm1",
            "qkv.weight": "(3C, C)", "qkv.bias": "(3C,)", "proj.weight": "(C, C)", "proj.bias": "(C,)",
            "relative_position_bias_table": "((2*window-1)**2, heads)",
            "mask": "(nW, N, N) attn_mask of 0/-100 (no gradient; absent when shift = 0)"},
    outputs=dict(out="(batch, H*W, C)"),
    differentiable=("x",) + tuple(ref_wa.WINDOW_MSA_PARAM_KEYS),
    functions=("window_msa_fwd", "window_msa_bwd"), optional=("mask",),
    make_inputs=_window_msa_inputs, forward=_window_msa_forward, backward=_window_msa_backward))

_DMCA_DEFAULTS = dict(batch=2, dim=8, shortcut_channels=16, sr_ratio=2, out_channels=16, H=6, W=6,
                      norm="group")
_DMCA_SHAPES = ref_dmca.dmca_param_shapes(8, 16, 2, 16)       # every key (sr_ratio > 1)
_register(OpSpec(
    name="dmca",
    summary="SparX's ganglion input path: d_proj(d_norm(shortcut)) -> k_in, v_in; q, k (spatially "
            "reduced), v; grouped channel attention; cat[x or q, attn, v]; channel shuffle; in_proj; "
            "channel padding to out_channels (eval-mode BatchNorm)",
    upstream="LMMMEng/SparX SparXSS2D.forward (is_cross_layer branch); sparx_ref.ref.dmca.dmca_fwd",
    defaults=_DMCA_DEFAULTS,
    semantic=("sr_ratio", "out_channels", "norm"),
    inputs={"x": "(batch, dim, H, W) the normed block input",
            "shortcut": "(batch, shortcut_channels, H, W) the concatenated earlier outputs",
            **{k: f"{shape} released parameter{' (BatchNorm buffer, no gradient)' if kind == 'buffer' else ''}"
               for k, (shape, kind) in _DMCA_SHAPES.items()}},
    outputs=dict(out="(batch, out_channels, H, W)"),
    differentiable=("x", "shortcut") + tuple(k for k, (_, kind) in _DMCA_SHAPES.items() if kind == "param"),
    functions=("dmca_fwd", "dmca_bwd"),
    optional=tuple(k for k in _DMCA_SHAPES if k.startswith(("q.0.", "k.0."))),   # only when sr_ratio > 1
    make_inputs=_dmca_inputs, forward=_dmca_forward, backward=_dmca_backward))


def op_config(name: str, overrides: dict | None = None) -> dict:
    """The op's default configuration updated with ``overrides`` (unknown keys: TypeError)."""
    spec = OPS[name]
    cfg = dict(spec.defaults)
    unknown = sorted(set(overrides or {}) - set(cfg))
    if unknown:
        raise TypeError(f"{name}: unknown config key(s) {unknown}; accepted: {sorted(cfg)}")
    cfg.update(overrides or {})
    return cfg
