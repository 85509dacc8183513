"""The Triton kernels for CUDA: ``backend`` (the backend) and ``_kernels`` (the jitted
kernels)."""
