"""The comparison table of ``sparx-ref check``: one :class:`Row` per tensor, a :class:`Report`.

Errors are relative per tensor, as everywhere in sparx_ref (:func:`sparx_ref.testing.rel_err`):
``max_rel = max|got - ref| / max|ref|``; ``max_abs = max|got - ref|``; the *worst index* is
where ``|got - ref|`` is largest (the first NaN/inf, if ``got`` has one: such a tensor never
passes). A tensor passes when ``max_rel <= tol``.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..testing import _to_numpy

# statuses of a row; only "ok" and "skipped" count as passing
OK, FAIL, MISSING, SHAPE, SKIPPED = "ok", "FAIL", "MISSING", "SHAPE", "skipped"

_BLOCK = re.compile(r"^(?:act\.|out\.|grad\.)?(layers\.\d+\.blocks\.\d+)(?:\.|$)")


def module_of(key: str) -> str:
    """The released module a tensor key belongs to: ``act.layers.2.blocks.4.op.attn`` ->
    ``layers.2.blocks.4``; other activations -> their own name (``act.patch_embed`` ->
    ``patch_embed``); outputs and gradients keep the full key (``out.logits``)."""
    m = _BLOCK.match(key)
    if m and key.startswith("act."):
        return m.group(1)
    return key[len("act."):] if key.startswith("act.") else key


@dataclass
class Row:
    """One compared tensor."""

    key: str                       # e.g. "out.y", "act.layers.0.blocks.1", "grad.x"
    status: str                    # ok | FAIL | MISSING | SHAPE | skipped
    shape: tuple = ()              # the reference shape
    got_shape: tuple | None = None
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    worst_index: tuple | None = None
    tol: float = float("nan")
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status in (OK, SKIPPED)


def compare(key: str, got, ref, tol: float) -> Row:
    """Compare one tensor ``got`` with the reference ``ref`` under relative tolerance ``tol``."""
    ref = np.asarray(_to_numpy(ref), dtype=np.float64)
    if got is None:
        return Row(key, MISSING, ref.shape, tol=tol, note="not in the results")
    got_raw = _to_numpy(got)
    if got_raw.dtype.kind not in "fiub":
        return Row(key, FAIL, ref.shape, tuple(got_raw.shape), tol=tol,
                   note=f"not a numeric array (dtype {got_raw.dtype})")
    got = np.asarray(got_raw, dtype=np.float64)
    if got.shape != ref.shape:
        return Row(key, SHAPE, ref.shape, tuple(got.shape), tol=tol,
                   note=f"shape {tuple(got.shape)} but the reference is {tuple(ref.shape)}")
    if ref.size == 0:
        return Row(key, OK, ref.shape, got.shape, 0.0, 0.0, None, tol)
    finite = np.isfinite(got)
    if not finite.all():
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), got.shape))
        return Row(key, FAIL, ref.shape, got.shape, float("inf"), float("inf"), idx, tol,
                   note=f"non-finite value {got[idx]!r}")
    diff = np.abs(got - ref)
    flat = int(np.argmax(diff))
    idx = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
    max_abs = float(diff.reshape(-1)[flat])
    scale = float(np.max(np.abs(ref)))
    max_rel = max_abs / scale if scale > 0 else max_abs
    return Row(key, OK if max_rel <= tol else FAIL, ref.shape, got.shape, max_abs, max_rel,
               idx if max_abs > 0 else None, tol)


@dataclass
class Report:
    """The result of a check: per-tensor rows in forward order (activations, outputs, then
    gradients), ``passed``, ``first_divergence`` and a readable ``str()``."""

    name: str
    dtype: str                      # the precision whose tolerances were used
    rows: list = field(default_factory=list)
    kind: str = ""                  # "op" or "model"
    notes: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)   # result keys the golden does not know

    @property
    def passed(self) -> bool:
        """True when every row passed (missing optional tensors are "skipped")."""
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.passed]

    @property
    def missing(self) -> list:
        """Keys that had to be in the results but were not."""
        return [r.key for r in self.rows if r.status == MISSING]

    @property
    def first_failure(self) -> Row | None:
        """The first failing row in forward order (activations before outputs before grads)."""
        return next(iter(self.failures), None)

    @property
    def first_divergence(self) -> str | None:
        """Where the implementation first goes wrong: for models the released module name of
        the first failing activation (``"layers.1.blocks.1"``), else the first failing key
        (``"out.xs"``, ``"grad.u"``); None when everything passed."""
        row = self.first_failure
        return None if row is None else module_of(row.key)

    def __getitem__(self, key: str) -> Row:
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(f"no row {key!r} in this report; keys: {[r.key for r in self.rows][:20]} ...")

    def format(self, failures_only: bool = False) -> str:
        head = f"sparx-ref check: {self.name} ({self.kind}, tolerances for {self.dtype})"
        lines = [head]
        lines += [f"  note: {n}" for n in self.notes]
        rows = self.failures if failures_only else self.rows
        width = max([len(r.key) for r in rows] + [6])
        lines.append(f"  {'tensor':<{width}}  {'shape':<18} {'max_abs':>9} {'max_rel':>9} "
                     f"{'tol':>7}  {'status':<7} worst index / note")
        for r in rows:
            shape = str(tuple(r.shape)).replace(" ", "")
            where = "" if r.worst_index is None else str(r.worst_index).replace(" ", "")
            extra = "  ".join(s for s in (where, r.note) if s)
            lines.append(f"  {r.key:<{width}}  {shape:<18} {_num(r.max_abs)} {_num(r.max_rel)} "
                         f"{_num(r.tol, 7, 0)}  {r.status:<7} {extra}".rstrip())
        n_fail, n = len(self.failures), len(self.rows)
        skipped = sum(r.status == SKIPPED for r in self.rows)
        if self.unexpected:
            shown = ", ".join(self.unexpected[:8]) + (" ..." if len(self.unexpected) > 8 else "")
            lines.append(f"  unexpected keys in the results (ignored): {shown}")
        if self.passed:
            lines.append(f"PASSED: {n - skipped} tensors within tolerance"
                         + (f" ({skipped} optional ones not provided)" if skipped else ""))
        else:
            counts = {}
            for r in self.failures:
                counts[r.status] = counts.get(r.status, 0) + 1
            words = {FAIL: "over tolerance", MISSING: "missing", SHAPE: "wrong shape"}
            detail = ", ".join(f"{v} {words.get(k, k)}" for k, v in counts.items())
            lines.append(f"FAILED: {n_fail} of {n} tensors ({detail})")
            if self.missing:
                shown = ", ".join(self.missing[:12]) + (" ..." if len(self.missing) > 12 else "")
                lines.append(f"  missing: {shown}")
            first = self.first_failure
            lines.append(f"  first divergence: {self.first_divergence}"
                         + (f" (tensor {first.key})" if first.key != self.first_divergence else ""))
        return "\n".join(lines)

    def format_by_module(self) -> str:
        """One line per released module (activations) or per module's parameters (gradients),
        in forward order: the worst relative error and how many tensors failed."""
        groups = OrderedDict()
        for r in self.rows:
            group, _, rest = r.key.partition(".")
            m = _BLOCK.match(rest) or _BLOCK.match("act." + rest)
            if m:
                module = m.group(1)
            elif group == "grad":
                d = re.match(r"^(layers\.\d+\.downsample)\.", rest)
                module = d.group(1) if d else rest.split(".")[0]
            else:
                module = rest
            groups.setdefault((group, module), []).append(r)
        width = max([len(f"{g} {m}") for g, m in groups] + [6])
        lines = [f"sparx-ref check: {self.name} ({self.kind}, tolerances for {self.dtype}), by module",
                 f"  {'module':<{width}}  {'tensors':>7} {'failed':>6} {'max_rel':>9}"]
        for (group, module), rows in groups.items():
            worst = max((r.max_rel for r in rows if not np.isnan(r.max_rel)), default=float("nan"))
            failed = sum(not r.passed for r in rows)
            lines.append(f"  {group + ' ' + module:<{width}}  {len(rows):>7} {failed:>6} {_num(worst)}"
                         + ("  <- first divergence" if failed and module == self.first_divergence
                            and group == "act" else ""))
        lines.append(self.format(failures_only=True).splitlines()[-1] if self.passed else
                     "\n".join(l for l in self.format(failures_only=True).splitlines()
                                if l.startswith(("FAILED", "  missing", "  first divergence"))))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _num(v: float, width: int = 9, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-".rjust(width)
    if v == 0:
        return "0".rjust(width)
    return f"{v:.{digits}e}".rjust(width)
