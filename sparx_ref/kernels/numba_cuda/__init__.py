"""numba_cuda kernels; see sparx_ref.kernels.registry for the table and conventions."""
