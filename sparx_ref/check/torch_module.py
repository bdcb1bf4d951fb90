"""Check a PyTorch implementation of SparX-Mamba, Swin or SparX-Swin block by block.

:func:`check_torch_module` loads the oracle's weights (the released state_dict keys) into
your module, registers forward hooks on the modules named like the released ones
(``patch_embed``, ``layers.{s}.blocks.{i}``, ``layers.{s}.blocks.{i}.op``,
``layers.{s}.downsample``, ...), runs one input and compares every captured output with the
NumPy oracle's activation of the same name, in forward order. The report names the first
block that diverges.

:func:`torch_results` runs your module on a golden directory's inputs and returns the
results mapping that ``sparx-ref check`` reads (save it with ``np.savez``).
"""
from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

from ..checkpoint import to_torch_state_dict
from ..tolerances import _dtype_name
from .golden import _f32_exact, _model_reference, compare_to_reference, load_golden
from .models import model_config, required_activation
from .report import MISSING

# recorded name -> other module names that produce the same tensor in the released code
_ALIASES = [(re.compile(r"^layers\.(\d+)\.out$"), r"layers.\1.downsample")]


def _module_candidates(name: str) -> list:
    return [name] + [rx.sub(repl, name) for rx, repl in _ALIASES if rx.match(name)]


def _first_tensor(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(out, dict):
        for item in out.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _np(t) -> np.ndarray:
    """A detached CPU NumPy copy (half precisions widened to float32)."""
    import torch
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.numpy().copy()


def _run_hooked(module, x: np.ndarray, act_names, cotangent=None):
    """Run ``module`` on ``x`` with forward hooks on ``act_names`` (released module names).

    Returns (results mapping keyed act.*/out.logits/grad.*, {act name: why it is absent})."""
    import torch

    param = next(module.parameters())
    dtype, device = param.dtype, param.device
    modules = dict(module.named_modules())
    captured, absent, handles = OrderedDict(), {}, []

    def make_hook(key):
        def hook(_mod, _inp, out):
            t = _first_tensor(out)
            if t is not None:
                captured[key] = _np(t)
        return hook

    for name in act_names:
        target = next((c for c in _module_candidates(name) if c in modules), None)
        if target is None:
            absent[name] = f"no module named {name!r} in your model"
            continue
        handles.append(modules[target].register_forward_hook(make_hook(name)))
    was_training = module.training
    module.eval()
    try:
        xt = torch.tensor(x, dtype=dtype, device=device, requires_grad=cotangent is not None)
        if cotangent is None:
            with torch.no_grad():
                logits = _first_tensor(module(xt))
        else:
            module.zero_grad(set_to_none=True)
            logits = _first_tensor(module(xt))
            g = torch.tensor(cotangent, dtype=logits.dtype, device=device)
            (logits * g).sum().backward()
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    results = OrderedDict((f"act.{k}", captured[k]) for k in act_names if k in captured)
    for name in act_names:
        if name not in captured and name not in absent:
            absent[name] = "the hooked module never ran"
    results["out.logits"] = _np(logits)
    if cotangent is not None:
        if xt.grad is not None:
            results["grad.x"] = _np(xt.grad)
        for pname, p in module.named_parameters():
            if p.grad is not None:
                results[f"grad.{pname}"] = _np(p.grad)
    return results, absent


def _load_weights(module, state_dict):
    import torch

    param = next(module.parameters())
    tsd = to_torch_state_dict(state_dict, param.dtype)
    tsd = OrderedDict((k, v.to(param.device)) for k, v in tsd.items())
    own = list(module.state_dict())
    missing = [k for k in own if k not in tsd]                  # in state_dict order
    unexpected = [k for k in tsd if k not in set(own)]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")
        raise ValueError(f"could not load the oracle's weights (released key names) into your module: "
                         f"your module has {len(missing)} keys the oracle lacks [{show(missing)}] and "
                         f"lacks {len(unexpected)} of the oracle's [{show(unexpected)}]")
    try:
        module.load_state_dict(tsd, strict=True)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"could not load the oracle's weights (released key names) into your module: "
                         f"{err}") from err
    return torch


def check_torch_module(module, name: str, config: dict | None = None, input=None, seed: int = 0,
                       grads: bool = False, load_weights: bool = True, dtype=None):
    """Check a PyTorch SparX-Mamba / Swin / SparX-Swin module block by block against the oracle.

    Args:
        module: your ``torch.nn.Module`` (any dtype/device); its state_dict keys must be the
            released ones, and its submodules should be named like the released modules.
        name: the model: ``"sparx_mamba"``, ``"swin"``, ``"sparx_swin"`` (mini configs of
            :data:`sparx_ref.check.models.MINI_CONFIGS`) or a variant (``"sparx_mamba_t"``).
            Build your module with the same configuration (``config`` overrides it, released
            keyword names; ``input_shape`` sets the input size).
        input: images ``(B, C, H, W)`` (NumPy or torch); default: drawn from ``seed``.
        seed: seeds the oracle's test weights (:func:`~sparx_ref.check.models.random_weights`)
            and the default input and cotangent.
        grads: also compare the gradients of ``sum(logits * G)`` (G drawn from ``seed``) with
            respect to the input and every parameter (your module's parameter names).
        load_weights: load the oracle's state_dict into ``module`` first (strict); with False,
            your module's own weights are loaded into the oracle instead.
        dtype: whose tolerances apply (default: your module's parameter dtype).

    Returns a :class:`~sparx_ref.check.report.Report`: activations in forward order (only the
    ones your module has modules for; block-level ones missing are failures), the logits,
    then the gradients; ``report.first_divergence`` is the first block that diverges.
    """
    from ..testing import _to_numpy

    cfg = model_config(name, config)
    param = next(module.parameters())
    dtype = _dtype_name(dtype or param.dtype)
    rng = np.random.default_rng([seed, 1])
    x = _f32_exact(rng.standard_normal(cfg["input_shape"])) if input is None else _to_numpy(input)
    cot = None
    if grads:
        cot = _f32_exact(rng.standard_normal((x.shape[0], cfg.get("num_classes", 1000))))
    user_sd = None
    if not load_weights:
        user_sd = OrderedDict((k, _to_numpy(v)) for k, v in module.state_dict().items())
    oracle, _, _, reference = _model_reference(name, cfg, seed, x=np.asarray(x, np.float64),
                                               state_dict=user_sd, cotangent=cot,
                                               want_grads=grads)
    if load_weights:
        _load_weights(module, oracle.state_dict())
    act_names = [k[4:] for k in reference if k.startswith("act.")]
    results, absent = _run_hooked(module, np.asarray(x), act_names, cot)
    report = compare_to_reference(name, "model", reference, results, dtype,
                                  required=lambda k: required_activation(k[4:]))
    for row in report.rows:
        if row.status == MISSING and row.key.startswith("act."):
            row.note = absent.get(row.key[4:], row.note)
    report.notes.insert(0, f"hooked {sum(k.startswith('act.') for k in results)} of {len(act_names)} "
                           f"oracle activations by module name")
    return report


def torch_results(module, golden_dir, grads: bool = True, load_weights: bool = True) -> dict:
    """Run ``module`` on a model golden directory's input (after loading its ``param.*``
    weights) with hooks on the released module names; return the results mapping
    ``sparx-ref check`` reads: ``np.savez("results.npz", **torch_results(model, DIR))``."""
    manifest, arrays = load_golden(golden_dir)
    if manifest["kind"] != "model":
        raise ValueError(f"{golden_dir} holds the op {manifest['name']!r}; torch_results needs a model golden")
    if load_weights:
        _load_weights(module, OrderedDict((k[6:], v) for k, v in arrays.items() if k.startswith("param.")))
    act_names = [k[4:] for k in manifest["results"] if k.startswith("act.")]
    cot = arrays.get("cot.logits") if grads else None
    results, _ = _run_hooked(module, arrays["in.x"], act_names, cot)
    return dict(results)
