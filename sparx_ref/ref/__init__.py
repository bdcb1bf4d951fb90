"""The oracle: pure-NumPy reference ops, each a forward ``(out, cache)`` and a hand-derived
backward ``(dout, cache) -> dict`` (data-movement ops return the array; their backward is the
adjoint op). float64 by default, float32 accepted.

- :mod:`.layers`           conv, linear, norms, activations, pooling, channel shuffle/padding
- :mod:`.scan`             the selective scan (sequential, chunked, materialised)
- :mod:`.ss2d`             SS2D cross-scan/merge, the 2-D scan, the released ``forward_ssm``
- :mod:`.window_attention` Swin's window attention and its partition/shift/mask/bias ops
- :mod:`.dmca`             the ganglion layers' DMCA channel attention and input path
"""
