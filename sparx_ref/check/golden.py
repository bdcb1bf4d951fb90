"""Golden test vectors: write them (``sparx-ref golden``), check results against them
(``sparx-ref check``), and the Python API :func:`check`.

A golden directory holds ``golden.npz`` and ``manifest.json``. Keys of the npz, by prefix:

- ``in.<name>``    inputs of the op (``in.x`` for a model), in the golden's dtype; every value
  is exactly representable in float32, so float32 and float64 implementations see the same
  numbers.
- ``param.<key>``  models only: the full state_dict under the released key names.
- ``cot.<name>``   the cotangent of output ``<name>`` (stored, float32-exact values).
- ``out.<name>``   reference outputs (``out.logits`` for a model), float64.
- ``act.<module>`` models only: activations named like the released modules, in forward
  order (``act.patch_embed``, ``act.layers.2.blocks.4``, ``act.layers.2.blocks.4.op``, ...).
- ``grad.<name>``  reference gradients of ``sum_o sum(out.<o> * cot.<o>)`` with respect to
  ``in.<name>`` / ``param.<name>``, float64.

The reference is always computed in float64 (the oracle dtype) from the stored inputs. A
results file holds the ``out.*``, ``act.*`` and (optionally) ``grad.*`` keys of the manifest's
``results`` list, with the same shapes.

Tolerances (:mod:`sparx_ref.tolerances`, relative per tensor, for the golden's dtype or the
``--dtype`` given to ``check``): ops use ``"kernel"`` for outputs and gradients (a fast
implementation vs the reference computed in float64 on the same inputs); models use
``"golden_out"`` for logits and activations and ``"golden_grad"`` for gradients (a whole
model vs a golden run).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..tolerances import _dtype_name, tolerance
from .models import build_oracle, is_model, model_config, required_activation, run_oracle
from .ops import OPS, op_config
from .report import MISSING, Report, Row, compare

FORMAT = "sparx-ref golden v1"
NPZ_NAME, MANIFEST_NAME = "golden.npz", "manifest.json"
RESULT_GROUPS = ("act", "out", "grad")      # the groups a results file provides, in compare order
TOLERANCE_KINDS = {"op": {"out": "kernel", "grad": "kernel"},
                   "model": {"act": "golden_out", "out": "golden_out", "grad": "golden_grad"}}


def available_names() -> list:
    """Every name ``sparx-ref golden`` accepts: the ops, then the model names."""
    from ..models import MODEL_NAMES
    return list(OPS) + list(MODEL_NAMES)


def _f32_exact(a: np.ndarray) -> np.ndarray:
    """Round to the nearest float32 value, returned as float64 (integer arrays unchanged)."""
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        return a
    return a.astype(np.float64).astype(np.float32).astype(np.float64)


def _cast(a, dtype):
    """Float arrays to ``dtype``; integer buffers (num_batches_tracked) and None unchanged."""
    if a is None:
        return None
    a = np.asarray(a)
    return a.astype(dtype) if a.dtype.kind == "f" else a


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def _check_dtype(dtype) -> str:
    name = _dtype_name(dtype)
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return name


# ---------------------------------------------------------------------------------------
# computing the reference
# ---------------------------------------------------------------------------------------
def _op_reference(name, cfg, rng=None, inputs=None, cotangents=None, want_grads=True):
    """(inputs, cotangents, reference OrderedDict "out.*"/"grad.*") for op ``name``.

    Inputs are drawn from ``rng`` (float32-exact) unless given; the reference is float64."""
    spec = OPS[name]
    if inputs is None:
        inputs = {k: (None if v is None else _f32_exact(v)) for k, v in spec.make_inputs(cfg, rng).items()}
    x64 = {k: _cast(v, np.float64) for k, v in inputs.items()}
    outputs, _ = spec.run(x64, cfg)
    if want_grads and cotangents is None:
        cotangents = {k: _f32_exact(rng.standard_normal(v.shape)) for k, v in outputs.items()}
    grads = None
    if want_grads:
        cot64 = {k: np.asarray(v, dtype=np.float64) for k, v in cotangents.items()}
        _, grads = spec.run(x64, cfg, cot64)
    ref = OrderedDict((f"out.{k}", v) for k, v in outputs.items())
    for k, v in (grads or {}).items():
        ref[f"grad.{k}"] = v
    return inputs, cotangents, ref


def _model_reference(name, cfg, seed, x=None, state_dict=None, cotangent=None, want_grads=True,
                     rng=None):
    """(model, x, cotangent, reference OrderedDict "act.*"/"out.logits"/"grad.*")."""
    model = build_oracle(name, cfg, seed)
    if state_dict is not None:
        from ..checkpoint import to_numpy_state_dict
        sd = to_numpy_state_dict(state_dict)
        model.load_state_dict(OrderedDict(
            (k, np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
            for k, v in sd.items()))
    rng = rng if rng is not None else np.random.default_rng([seed, 1])
    if x is None:
        x = _f32_exact(rng.standard_normal(cfg["input_shape"]))
    x64 = np.asarray(x, dtype=np.float64)
    if want_grads and cotangent is None:
        n_out = model.cfg["num_classes"]
        cotangent = _f32_exact(rng.standard_normal((x64.shape[0], n_out)))
    logits, acts, grads = run_oracle(model, x64, np.asarray(cotangent, dtype=np.float64)
                                     if want_grads else None)
    ref = OrderedDict((f"act.{k}", v) for k, v in acts.items())
    ref["out.logits"] = logits
    for k, v in (grads or {}).items():
        ref[f"grad.{k}"] = v
    return model, x, cotangent, ref


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_golden(name: str, out_dir, config: dict | None = None, dtype="float64", seed: int = 0,
                 grads: bool | None = None) -> Path:
    """Write ``golden.npz`` + ``manifest.json`` for op or model ``name`` into ``out_dir``.

    ``config`` overrides the op's default sizes/options or the model's (mini or released)
    configuration (plus ``input_shape``); ``dtype`` is the precision the vectors are meant to
    test (inputs stored in it; references stay float64); ``grads`` defaults to True except for
    full-size models. Returns the manifest path.
    """
    dtype = _check_dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays, keys = OrderedDict(), OrderedDict()

    def put(key, value, group, doc, required=None, tol=None):
        arr = np.asarray(value)
        arrays[key] = arr
        entry = dict(group=group, shape=list(arr.shape), dtype=arr.dtype.name, doc=doc)
        if required is not None:
            entry["required"] = required
        if tol is not None:
            entry["tolerance"] = tol
        keys[key] = entry

    if name in OPS:
        kind, spec = "op", OPS[name]
        cfg = op_config(name, config)
        want = True if grads is None else bool(grads)
        inputs, cots, ref = _op_reference(name, cfg, rng=rng, want_grads=want)
        for k, v in inputs.items():
            if v is not None:
                put(f"in.{k}", _cast(v, dtype), "in", spec.inputs[k])
        for k, v in (cots or {}).items():
            put(f"cot.{k}", v.astype(dtype), "cot", f"cotangent of out.{k}")
        summary, upstream = spec.summary, spec.upstream
        absent = [k for k, v in inputs.items() if v is None]
    elif is_model(name):
        kind = "model"
        cfg = model_config(name, config)
        full = name not in ("sparx_mamba", "swin", "sparx_swin")
        want = (not full) if grads is None else bool(grads)
        model, x, cot, ref = _model_reference(name, cfg, seed, want_grads=want, rng=rng)
        put("in.x", np.asarray(x).astype(dtype), "in", "(B, in_chans, H, W) input images")
        for k, v in model.state_dict().items():
            put(f"param.{k}", v.astype(dtype) if v.dtype.kind == "f" else v, "param",
                "state_dict entry (released key name)")
        if want:
            put("cot.logits", np.asarray(cot).astype(dtype), "cot", "cotangent of out.logits")
        summary = f"{name}: the whole NumPy oracle model (eval mode), {'released' if full else 'mini'} size"
        upstream = f"sparx_ref.build_model({name!r}) with sparx_ref.check.models.random_weights"
        absent = []
    else:
        raise ValueError(f"unknown op or model {name!r}; expected one of {available_names()}")

    kinds = TOLERANCE_KINDS[kind]
    for k, v in ref.items():
        group, sub = k.split(".", 1)
        tol = tolerance(dtype, kinds[group])
        if group == "act":
            doc = f"output of the released module {sub}" if required_activation(sub) else \
                f"sub-block activation {sub} (compared when present)"
            put(k, v, group, doc, required=required_activation(sub), tol=tol)
        elif group == "out":
            put(k, v, group, "reference output (float64)", required=True, tol=tol)
        else:
            src = "in" if f"in.{sub}" in arrays else "param"
            put(k, v, group, f"d/d {src}.{sub} of sum(out * cot) (float64)", required=True, tol=tol)

    npz_path = out_dir / NPZ_NAME
    np.savez_compressed(npz_path, **arrays)     # reproducible bytes: zip entries carry no timestamps
    result_keys = [k for k in ref]
    manifest = OrderedDict(
        format=FORMAT, name=name, kind=kind, summary=summary, upstream=upstream,
        config=_json_safe(cfg), seed=int(seed), dtype=dtype, reference_dtype="float64",
        npz=NPZ_NAME, sha256=_sha256(npz_path), bytes=npz_path.stat().st_size,
        tolerance={group: dict(kind=kinds[group], value=tolerance(dtype, kinds[group]))
                   for group in kinds if any(k.startswith(group + ".") for k in ref)},
        convention=("grad.<k> is the gradient of sum over outputs o of sum(out.<o> * cot.<o>) with "
                    "respect to in.<k> (or param.<k>). Errors are relative per tensor: "
                    "max|got - ref| / max|ref|; a tensor passes when that is <= its tolerance."),
        how_to=("Load golden.npz, run your implementation on the in.* arrays"
                + (" with the param.* weights (load_state_dict)" if kind == "model" else "")
                + " and the config above, save your outputs under the keys listed in 'results' "
                  "(np.savez('results.npz', **{key: array})), then run: sparx-ref check DIR results.npz. "
                  "out.* and required act.* keys must be present; grad.* keys are checked when any is "
                  "present (then all of them). Inputs are float32-exact, so a float32 implementation "
                  "can read them without rounding error."),
        absent_inputs=absent,
        results=result_keys,
        keys=keys,
    )
    from .. import __version__
    manifest["created_by"] = f"sparx_ref {__version__}"
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# reading and checking
# ---------------------------------------------------------------------------------------
def load_golden(golden_dir) -> tuple:
    """(manifest dict, OrderedDict of arrays); verifies the format and the sha256."""
    golden_dir = Path(golden_dir)
    mpath = golden_dir / MANIFEST_NAME
    if not mpath.exists():
        raise FileNotFoundError(f"{golden_dir}: no {MANIFEST_NAME} (is this a directory written by "
                                f"'sparx-ref golden'?)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    npz_path = golden_dir / manifest["npz"]
    digest = _sha256(npz_path)
    if digest != manifest["sha256"]:
        raise ValueError(f"{npz_path}: sha256 {digest} does not match the manifest's {manifest['sha256']} "
                         f"(the golden file was modified or truncated)")
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = OrderedDict((k, data[k]) for k in data.files)
    return manifest, arrays


def _load_results(results) -> dict:
    if isinstance(results, (str, Path)):
        path = Path(results)
        if not path.exists():
            raise FileNotFoundError(f"results file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    return dict(results)


def compare_to_reference(name: str, kind: str, reference: "OrderedDict", results: dict,
                         dtype: str, required=None, golden_dtype: str | None = None) -> Report:
    """The shared comparison: ``reference`` keyed ``act.*``/``out.*``/``grad.*`` (in forward
    order) vs ``results``; ``required(key) -> bool`` says whether a missing activation fails."""
    kinds = TOLERANCE_KINDS[kind]
    report = Report(name=name, dtype=dtype, kind=kind)
    has_grads = any(k.startswith("grad.") for k in results)
    skipped_optional = []
    for group in RESULT_GROUPS:
        for key, ref in reference.items():
            if not key.startswith(group + "."):
                continue
            tol = tolerance(dtype, kinds[group])
            got = results.get(key)
            if got is None:
                if group == "grad" and not has_grads:
                    continue
                if group == "act" and required is not None and not required(key):
                    skipped_optional.append(key)
                    continue
                report.rows.append(Row(key, MISSING, tuple(np.shape(ref)), tol=tol,
                                       note="not in the results"))
                continue
            report.rows.append(compare(key, got, ref, tol))
    n_grads = sum(k.startswith("grad.") for k in reference)
    if n_grads and not has_grads:
        report.notes.append(f"gradients not checked: the results have no grad.* key "
                            f"({n_grads} available)")
    if skipped_optional:
        report.notes.append(f"{len(skipped_optional)} optional activations not provided, not compared "
                            f"(e.g. {skipped_optional[0]})")
    ignore = ("in.", "cot.", "param.")
    report.unexpected = sorted(k for k in results if k not in reference and not k.startswith(ignore))
    float_dtypes = {np.asarray(v).dtype.name for k, v in results.items()
                    if k in reference and np.asarray(v).dtype.kind == "f"}
    if golden_dtype and dtype != golden_dtype:
        report.notes.append(f"golden written for {golden_dtype}; tolerances of {dtype} used")
    if float_dtypes and float_dtypes != {dtype}:
        report.notes.append(f"results are {'/'.join(sorted(float_dtypes))} but the tolerances are "
                            f"those of {dtype}" + (" (use --dtype float32 / dtype='float32')"
                                                   if "float32" in float_dtypes and dtype == "float64" else ""))
    return report


def check_golden(golden_dir, results, dtype=None) -> Report:
    """Compare ``results`` (a path to an .npz or a mapping key -> array) with a golden directory.

    ``dtype`` chooses whose tolerances apply (default: the golden's dtype)."""
    manifest, arrays = load_golden(golden_dir)
    dtype = _check_dtype(dtype or manifest["dtype"])
    results = _load_results(results)
    reference = OrderedDict((k, arrays[k]) for k in manifest["results"])
    keys = manifest["keys"]
    return compare_to_reference(manifest["name"], manifest["kind"], reference, results, dtype,
                                required=lambda k: keys[k].get("required", True),
                                golden_dtype=manifest["dtype"])


def golden_inputs(golden_dir) -> dict:
    """The inputs of a golden directory, as the op/model takes them: ``{"x": ..., ...}`` for an
    op; for a model ``{"x": ..., "state_dict": OrderedDict}``; plus ``"cotangents"``."""
    manifest, arrays = load_golden(golden_dir)
    out = {k[3:]: v for k, v in arrays.items() if k.startswith("in.")}
    if manifest["kind"] == "model":
        out["state_dict"] = OrderedDict((k[6:], v) for k, v in arrays.items() if k.startswith("param."))
    out["cotangents"] = {k[4:]: v for k, v in arrays.items() if k.startswith("cot.")}
    return out


def oracle_results(golden_dir, dtype="float64") -> dict:
    """Run the NumPy oracle on a golden directory's inputs, in ``dtype``, and return a results
    mapping keyed as the manifest documents (what ``np.savez`` of your results should look
    like). In float64 this reproduces the golden exactly."""
    manifest, arrays = load_golden(golden_dir)
    dtype = _check_dtype(dtype)
    name, cfg = manifest["name"], manifest["config"]
    if manifest["kind"] == "op":
        spec = OPS[name]
        x = {k: _cast(arrays.get(f"in.{k}"), dtype) for k in spec.inputs}
        cots = {k[4:]: v.astype(dtype) for k, v in arrays.items() if k.startswith("cot.")}
        outputs, grads = spec.run(x, cfg, cots or None)
        res = {f"out.{k}": v for k, v in outputs.items()}
        res.update({f"grad.{k}": v for k, v in (grads or {}).items()})
        return res
    model = build_oracle(name, cfg, manifest["seed"])
    sd = OrderedDict((k[6:], v.astype(np.float64) if v.dtype.kind == "f" else v)
                     for k, v in arrays.items() if k.startswith("param."))
    model.load_state_dict(sd)
    if dtype == "float32":
        model.astype(np.float32)
        object.__setattr__(model, "dtype", np.dtype(np.float32))  # Swin's astype keeps .dtype
    cot = arrays.get("cot.logits")
    logits, acts, grads = run_oracle(model, arrays["in.x"].astype(dtype),
                                     None if cot is None else cot.astype(dtype))
    res = {f"act.{k}": v for k, v in acts.items()}
    res["out.logits"] = logits
    res.update({f"grad.{k}": v for k, v in (grads or {}).items()})
    return res


# ---------------------------------------------------------------------------------------
# the Python API
# ---------------------------------------------------------------------------------------
def _prefixed(mapping, group):
    """Keys already prefixed ``act.``/``out.``/``grad.`` stay; others get ``group + "."``."""
    return {(k if re.match(r"^(act|out|grad)\.", k) else f"{group}.{k}"): v
            for k, v in (mapping or {}).items()}


def check(name: str, inputs: dict, outputs: dict, grads: dict | None = None, dtype=None,
          cotangent=None, config: dict | None = None, seed: int = 0) -> Report:
    """Compute the oracle on ``inputs`` and compare ``outputs`` (and ``grads``) with it.

    Ops (``selective_scan``, ``cross_scan``, ...): ``inputs`` keyed like the op's inputs
    (``{"u": ..., "delta": ..., ...}``; optional ones may be omitted), ``outputs`` keyed like its
    outputs (``{"y": ...}``), ``grads`` keyed like its inputs, the gradients of
    ``sum(out * cotangent)`` (``cotangent``: an array for a single output, or a mapping).
    ``config`` sets the semantic options (e.g. ``{"delta_softplus": False}``, ``{"H": 4, "W": 5}``
    for cross_merge).

    Models (``sparx_mamba``, ``swin``, ``sparx_swin`` mini configs, or a variant name):
    ``inputs = {"x": images, "state_dict": weights}`` (weights default to the golden test
    weights of ``seed``), ``outputs`` with ``"logits"`` and any activations keyed by released
    module names (``"layers.0.blocks.1"``), ``grads`` keyed ``"x"`` and parameter names for the
    cotangent of the logits.

    ``dtype``: the precision of the implementation, selecting the tolerances (default: the
    dtype of the first output). Returns a :class:`~sparx_ref.check.report.Report`.
    """
    from ..testing import _to_numpy
    outputs = dict(outputs)
    if dtype is None:
        first = next(iter(outputs.values()), None)
        dtype = "float32" if first is not None and _to_numpy(first).dtype == np.float32 else "float64"
    dtype = _check_dtype(dtype)
    if grads and cotangent is None:
        raise ValueError("grads were given but no cotangent: pass cotangent= (the array whose "
                         "product with the outputs was summed and differentiated)")
    if name in OPS:
        spec = OPS[name]
        cfg = op_config(name, config)
        unknown = sorted(set(inputs) - set(spec.inputs))
        if unknown:
            raise ValueError(f"{name}: unknown input(s) {unknown}; the op takes {list(spec.inputs)}")
        x = {k: (None if inputs.get(k) is None else _to_numpy(inputs[k])) for k in spec.inputs}
        missing = [k for k in spec.inputs if x[k] is None and k not in spec.optional]
        if missing:
            raise ValueError(f"{name}: missing input(s) {missing}; the op takes {list(spec.inputs)}")
        cots = None
        if grads:
            cots = cotangent if isinstance(cotangent, dict) else {next(iter(spec.outputs)): cotangent}
            cots = {k: _to_numpy(v) for k, v in cots.items()}
        _, _, reference = _op_reference(name, cfg, inputs=x, cotangents=cots, want_grads=bool(grads))
        results = _prefixed({k: _to_numpy(v) for k, v in outputs.items()}, "out")
        results.update(_prefixed({k: _to_numpy(v) for k, v in (grads or {}).items()}, "grad"))
        return compare_to_reference(name, "op", reference, results, dtype)
    if not is_model(name):
        raise ValueError(f"unknown op or model {name!r}; expected one of {available_names()}")
    cfg = model_config(name, config)
    if "x" not in inputs or set(inputs) - {"x", "state_dict"}:
        raise ValueError(f"{name}: inputs must be {{'x': images, 'state_dict': weights (optional)}}, "
                         f"got keys {sorted(inputs)}")
    x = _to_numpy(inputs["x"])
    cot = None
    if grads:
        cot = _to_numpy(cotangent["logits"] if isinstance(cotangent, dict) else cotangent)
    _, _, _, reference = _model_reference(name, cfg, seed, x=x, state_dict=inputs.get("state_dict"),
                                          cotangent=cot, want_grads=bool(grads))
    results = {}
    for k, v in outputs.items():
        v = _to_numpy(v)
        if re.match(r"^(act|out)\.", k):
            results[k] = v
        elif k == "logits":
            results["out.logits"] = v
        else:
            results[f"act.{k}"] = v
    results.update(_prefixed({k: _to_numpy(v) for k, v in (grads or {}).items()}, "grad"))
    acts_given = any(k.startswith("act.") for k in results)
    return compare_to_reference(
        name, "model", reference, results, dtype,
        required=lambda k: acts_given and required_activation(k[4:]))
