"""Host-side pieces shared by the GPU group-normalisation kernels (CuPy, Numba-CUDA) and the
twins' dispatch: the launch geometry and the input checks (one fact in one place; no GPU
runtime imported)."""
from __future__ import annotations

THREADS = 256        # threads per block of every launch (BLOCK in the CUDA C source)
PLANES_PER_BLOCK = THREADS // 32   # the statistics kernels give each (sample, channel) plane a warp


def group_norm_dims(x, weight, bias, num_groups, check_shape) -> tuple[int, int, int, int]:
    """(B, C, S, G) of a group normalisation after checking the shapes: x (B, C, *spatial) with
    at least one channel and one spatial position (B may be 0), S the product of the spatial
    sizes, ``num_groups`` = G a positive integer dividing C, weight and bias (C,) or None, and
    fewer than 2**31 elements (the kernels index with 32-bit integers).
    ``check_shape(name, array, expected)`` raises ValueError naming the argument."""
    shape = tuple(int(s) for s in x.shape)
    if len(shape) < 3:
        raise ValueError(f"x must have at least 3 dimensions (B, C, *spatial), got shape {shape}")
    B, C = shape[:2]
    S = 1
    for s in shape[2:]:
        S *= s
    if C == 0 or S == 0:
        raise ValueError(f"x must have at least one channel and one spatial position (the statistics of "
                         f"an empty group are undefined), got shape {shape}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channels (x.shape[1] = {C})")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_shape(name, p, (C,))
    if B * C * S >= 2 ** 31:
        raise ValueError(f"x has {B * C * S} elements; these kernels index with 32-bit integers "
                         f"and take fewer than 2**31 (split the batch)")
    return B, C, S, num_groups
