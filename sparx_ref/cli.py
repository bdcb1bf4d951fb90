"""The ``sparx-ref`` command: ``demo``, ``golden``, ``check``.

    sparx-ref demo [--checkpoint PATH] ...      the main job (same as ``make demo``)
    sparx-ref golden OP_OR_MODEL -o DIR ...     write reference test vectors
    sparx-ref check GOLDEN_DIR RESULTS.npz      check someone's results against them
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "sparx_ref.demo", "golden": "sparx_ref.check", "check": "sparx_ref.check"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib
    module = importlib.import_module(commands[argv[0]])
    if argv[0] == "demo":
        return module.main(argv[1:])
    return module.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
