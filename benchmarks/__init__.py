"""Benchmarks of flexattn_jax beside PyTorch FlexAttention, cuDNN and XLA. Entry point: ``python -m benchmarks.run``."""
