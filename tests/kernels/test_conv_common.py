"""Host-side rules shared by the depthwise-conv kernels (sparx_ref/kernels/_conv_common.py)."""
import numpy as np
import pytest

from sparx_ref.kernels import _conv_common as cc


def _check_shape(name, a, expected):
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(a.shape)}")


@pytest.mark.parametrize("B,C,sms", [(64, 96, 132), (64, 2048, 132), (7, 3, 2), (1, 1, 132), (0, 5, 132),
                                     (5, 1, 1000), (128, 320, 114)])
def test_batch_slices_cover_the_batch_once_and_fill_the_gpu(B, C, sms):
    slices, per_slice = cc.batch_slices(B, C, sms)
    assert slices >= 1 and per_slice >= 1
    # the slices [s * per_slice, min(B, (s + 1) * per_slice)) tile the batch, none empty (B > 0)
    assert (slices - 1) * per_slice < max(B, 1) <= slices * per_slice or B == 0
    assert slices <= max(B, 1)
    if B > 0 and C * B <= cc.BLOCKS_PER_SM * sms:
        assert slices == B                       # small problems: one image per slice
    if C >= cc.BLOCKS_PER_SM * sms:
        assert slices == 1                       # enough channels already fill the GPU


def test_conv_dims_accepts_the_twins_shapes_and_names_bad_arguments():
    x, w, b = np.zeros((2, 6, 5, 7)), np.zeros((6, 1, 3, 5)), np.zeros(6)
    assert cc.conv_dims(x, w, b, _check_shape) == (2, 6, 5, 7, 3, 5)
    assert cc.conv_dims(np.zeros((0, 6, 5, 7)), w, None, _check_shape)[0] == 0
    with pytest.raises(ValueError, match="weight"):
        cc.conv_dims(x, np.zeros((5, 1, 3, 3)), None, _check_shape)
    with pytest.raises(ValueError, match="bias"):
        cc.conv_dims(x, w, np.zeros(5), _check_shape)
    with pytest.raises(ValueError, match="odd"):
        cc.conv_dims(x, np.zeros((6, 1, 2, 3)), None, _check_shape)
    with pytest.raises(ValueError, match=f"at most {cc.MAX_KERNEL}"):
        cc.conv_dims(x, np.zeros((6, 1, 9, 9)), None, _check_shape)
    with pytest.raises(ValueError, match="at least one channel"):
        cc.conv_dims(np.zeros((2, 0, 5, 7)), np.zeros((0, 1, 3, 3)), None, _check_shape)


def test_conv_dims_refuses_maps_the_32_bit_indices_cannot_address():
    class Huge:                                  # shape only: no 8 GiB allocation
        shape = (2 ** 16, 2 ** 8, 2 ** 4, 2 ** 3)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        cc.conv_dims(Huge(), np.zeros((2 ** 8, 1, 3, 3)), None, _check_shape)
