"""numba_cpu kernels; see sparx_ref.kernels.registry for the table and conventions."""
