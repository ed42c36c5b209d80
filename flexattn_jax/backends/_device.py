"""What the kernel wrappers ask of the GPU they launch on."""

from __future__ import annotations

import jax

__all__ = ["num_sms"]


def num_sms() -> int:
    """Streaming multiprocessors of the GPU; an H100's 132 without one (lowering for CUDA on a CPU, interpret mode)."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return 132
    return int(getattr(device, "core_count", 0) or 132) if device.platform == "gpu" else 132
