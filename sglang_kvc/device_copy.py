"""Host lists to device tensors without stalling the host.

`torch.tensor(values, device="cuda")` copies from pageable memory, which CUDA does
synchronously: the host waits until the GPU has finished all queued work, and then the GPU
idles while the host queues the next kernels. In a prefill step that happened for every
layer (docs/results/serving-profile-2026-11-29.md). Copying from pinned memory with
`non_blocking=True` is queued like a kernel instead (PyTorch keeps the pinned buffer alive
until the copy has run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence[int] | Sequence[float] | np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    # One construction for lists and numpy arrays on every device (torch.tensor(ndarray,
    # pin_memory=True) raises "Can't pin tensor constructed from numpy"), so the CPU tests
    # cover it and only the pin and the copy are CUDA's own.
    host = torch.as_tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
