"""flex attention as Pallas kernels with the Triton lowering (any CUDA GPU from Ampere on; interpret mode on CPU)."""
