"""Host-side pieces shared by the CuPy and Numba-CUDA depthwise-convolution kernels: the limits,
the launch geometry and the input checks (one fact in one place; no GPU runtime imported)."""
from __future__ import annotations

MAX_KERNEL = 7       # largest kh, kw: the strip backward keeps kh*kw + 1 sums in registers
STRIP = 4            # outputs per thread along a row (V in the kernels)
THREADS = 256        # threads per block of every launch (BLOCK in the CUDA C source)
BLOCKS_PER_SM = 4    # the strip backward splits the batch until C * slices reaches this x SMs


def conv_dims(x, weight, bias, check_shape) -> tuple[int, int, int, int, int, int]:
    """(B, C, H, W, kh, kw) of a depthwise "same" convolution after checking the shapes:
    x (B, C, H, W) with C >= 1 (B may be 0), weight (C, 1, kh, kw) with kh, kw odd and at most
    MAX_KERNEL, bias (C,) or None, and fewer than 2**31 elements (the kernels index with 32-bit integers).
    ``check_shape(name, array, expected)`` raises ValueError naming the argument."""
    B, C, H, W = (int(s) for s in x.shape)
    if C == 0:
        raise ValueError(f"x must have at least one channel, got shape {(B, C, H, W)}")
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    check_shape("weight", weight, (C, 1, kh, kw))
    if bias is not None:
        check_shape("bias", bias, (C,))
    if B * C * H * W >= 2 ** 31:
        raise ValueError(f"x has {B * C * H * W} elements; these kernels index with 32-bit integers "
                         f"and take fewer than 2**31 (split the batch)")
    if kh % 2 == 0 or kw % 2 == 0 or max(kh, kw) > MAX_KERNEL:
        raise ValueError(f"weight's kernel size must be odd and at most {MAX_KERNEL} in both "
                         f"dimensions, got {(kh, kw)}")
    return B, C, H, W, kh, kw


def batch_slices(B: int, C: int, sms: int) -> tuple[int, int]:
    """(slices, images per slice) of the strip backward: enough (channel, slice) blocks to give
    each of ``sms`` multiprocessors BLOCKS_PER_SM of them, at most one slice per image, and one
    (empty) slice for an empty batch."""
    slices = max(1, min(B, -(-BLOCKS_PER_SM * sms // max(C, 1))))
    per_slice = max(1, -(-B // slices))
    return max(1, -(-B // per_slice)), per_slice
