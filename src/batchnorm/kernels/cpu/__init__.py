"""The fused CPU kernels (numba): ``backend`` (the backend), ``backup`` (a layer's running
buffers set aside for the non-finite guard), ``warmup`` (compile ahead of use), and the
numba loops (``_nchw``, ``_nhwc``, ``_loops``, ``_params``, ``_act``, ``_math``)."""
