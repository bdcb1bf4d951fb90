"""Numba's real driver-side classes as the fast launch path uses them, on a machine without a GPU.

Run with the simulator OFF, in the same process as the compile checks (the Makefile does), since
the simulator replaces ``numba.cuda.cudadrv`` with stand-ins: ``MemoryPointer`` and
``DeviceNDArray`` are built here around a made-up device address (nothing is dereferenced).
What they check would otherwise only show on a GPU: the returned arrays of every Numba kernel
are built by ``_launch.as_array`` through these two helpers.
"""
import ctypes
import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    pytest.skip("the real Numba driver classes need the CUDA simulator off", allow_module_level=True)

from numba.cuda.cudadrv.devicearray import DeviceNDArray  # noqa: E402
from numba.cuda.cudadrv.driver import MemoryPointer  # noqa: E402

from sparx_ref.kernels.numba_cuda import _launch as L  # noqa: E402

BASE = 0x7F00_0000_0000        # a made-up device address: never dereferenced


def _allocation(nbytes=4096):
    return MemoryPointer(None, ctypes.c_void_p(BASE), nbytes)


def test_piece_points_into_its_allocation_and_holds_it():
    owner = _allocation()
    piece = L._piece(owner, BASE + 256, 1024)
    assert piece.device_pointer_value == BASE + 256 and piece.size == 1024
    assert piece.owner is owner                    # a strong reference: the allocation lives as long
    ref = owner.view(256, 256 + 1024)              # what Numba's own view gives
    assert ref.device_pointer_value == piece.device_pointer_value and ref.size == piece.size


@pytest.mark.parametrize("shape", [(2, 3, 4), (7,), (1, 5)])
def test_device_ndarray_copies_of_the_template_equal_numba_constructed_arrays(shape):
    dtype = np.dtype(np.float32)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    first = L._device_ndarray(shape, dtype, L._piece(_allocation(), BASE, nbytes))   # builds the template
    mem = L._piece(_allocation(), BASE + 512, nbytes)
    copy = L._device_ndarray(shape, dtype, mem)                                      # from the template
    built = DeviceNDArray(shape, L._c_strides(shape, dtype.itemsize), dtype, gpu_data=mem)
    assert type(copy) is DeviceNDArray and copy is not first
    assert set(vars(copy)) == set(vars(built))
    for name in ("shape", "strides", "dtype", "size", "ndim", "alloc_size", "stream"):
        assert getattr(copy, name) == getattr(built, name), name
    assert copy.gpu_data is mem and copy.device_ctypes_pointer.value == BASE + 512
    assert copy.__cuda_array_interface__ == built.__cuda_array_interface__
    assert copy.is_c_contiguous()
    flat = copy.reshape(int(np.prod(shape)))        # Numba's own operations work on the copy
    assert flat.shape == (int(np.prod(shape)),) and flat.device_ctypes_pointer.value == BASE + 512
    assert first.device_ctypes_pointer.value == BASE   # the first array kept its own memory
