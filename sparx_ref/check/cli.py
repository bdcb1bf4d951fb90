"""``sparx-ref golden`` and ``sparx-ref check``: the command-line side of :mod:`sparx_ref.check`.

    sparx-ref golden OP_OR_MODEL [--config JSON] [--dtype float64|float32] [--seed N]
                     [--grad | --no-grad] -o DIR
    sparx-ref golden all -o DIR          # every op and every mini model, one subdirectory each
    sparx-ref check GOLDEN_DIR RESULTS.npz [--dtype float32|float64] [--failures-only | --by-module]

``check`` exits with 0 only when every tensor passes, 1 when any fails or is missing, 2 on
a usage error (bad arguments, unreadable files).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .golden import available_names, check_golden, write_golden
from .models import FAMILIES
from .ops import OPS


def _config(text):
    if text is None:
        return None
    path = Path(text)
    if not text.lstrip().startswith("{") and path.exists():
        text = path.read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--config must be a JSON object or a JSON file: {err}") from None
    if not isinstance(cfg, dict):
        raise argparse.ArgumentTypeError(f"--config must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _golden_parser():
    p = argparse.ArgumentParser(prog="sparx-ref golden",
                                description="Write reference inputs, outputs and gradients (golden.npz + "
                                            "manifest.json) for an op or a model.")
    p.add_argument("name", choices=available_names() + ["all"], metavar="OP_OR_MODEL",
                   help=f"an op ({', '.join(OPS)}), a model ({', '.join(FAMILIES)}: mini sizes; "
                        f"variants like sparx_mamba_t: full size), or 'all'")
    p.add_argument("--config", type=_config, default=None,
                   help="JSON object (or file) overriding the default sizes/options or model config "
                        "(models also take input_shape)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="the precision the vectors test (selects the tolerances; default float64)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--grad", dest="grads", action="store_true", default=None,
                   help="store gradients (default: yes, except for full-size models)")
    g.add_argument("--no-grad", dest="grads", action="store_false")
    p.add_argument("-o", "--out", required=True, help="output directory")
    return p


def _check_parser():
    p = argparse.ArgumentParser(prog="sparx-ref check",
                                description="Compare your results with a directory written by 'sparx-ref golden'.")
    p.add_argument("golden_dir")
    p.add_argument("results", help=".npz with the keys listed in the manifest's 'results'")
    p.add_argument("--dtype", choices=("float64", "float32"), default=None,
                   help="whose tolerances apply (default: the golden's dtype)")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--failures-only", action="store_true", help="print only the failing tensors")
    view.add_argument("--by-module", action="store_true",
                      help="one line per released module (worst error, failures) instead of per tensor")
    return p


def golden_main(argv) -> int:
    args = _golden_parser().parse_args(argv)
    out = Path(args.out)
    if args.name == "all":
        if args.config:
            print("sparx-ref golden: --config cannot be used with 'all'", file=sys.stderr)
            return 2
        names = list(OPS) + list(FAMILIES)
        for name in names:
            path = write_golden(name, out / name, dtype=args.dtype, seed=args.seed, grads=args.grads)
            print(f"wrote {path.parent}")
        return 0
    try:
        path = write_golden(args.name, out, config=args.config, dtype=args.dtype, seed=args.seed,
                            grads=args.grads)
    except (TypeError, ValueError) as err:
        print(f"sparx-ref golden: {err}", file=sys.stderr)
        return 2
    manifest = json.loads(path.read_text())
    print(f"wrote {path.parent / manifest['npz']} and {path.name} ({manifest['bytes']} bytes, "
          f"sha256 {manifest['sha256'][:16]}...)")
    print(f"  {len(manifest['results'])} result keys expected, e.g. {', '.join(manifest['results'][:4])}")
    return 0


def check_main(argv) -> int:
    args = _check_parser().parse_args(argv)
    try:
        report = check_golden(args.golden_dir, args.results, dtype=args.dtype)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        print(f"sparx-ref check: {err}", file=sys.stderr)
        return 2
    print(report.format_by_module() if args.by_module else report.format(failures_only=args.failures_only))
    return 0 if report.passed else 1


def main(argv=None) -> int:
    """Entry for ``sparx_ref.cli``: ``argv[0]`` is ``"golden"`` or ``"check"``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("golden", "check"):
        print(__doc__.strip())
        return 2
    try:
        return golden_main(argv[1:]) if argv[0] == "golden" else check_main(argv[1:])
    except SystemExit as exc:      # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
