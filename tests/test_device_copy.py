"""sglang_kvc.device_copy.to_device: host lists and numpy arrays to device tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang_kvc.device_copy import to_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["list", "int64 array", "int32 array"])
def test_lists_and_numpy_arrays_arrive_with_the_requested_dtype(device, source):
    values = np.random.default_rng().integers(-(2**40), 2**40, size=37)
    if source == "int32 array":
        values = (values % 2**31).astype(np.int32)
    given = values.tolist() if source == "list" else values
    result = to_device(given, torch.int64, device)
    assert result.dtype == torch.int64 and result.device.type == device
    assert result.cpu().tolist() == [int(v) for v in values]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned copies need CUDA")
def test_numpy_arrays_are_copied_from_pinned_memory_on_cuda():
    """The crash of serving run 8: torch.tensor(ndarray, pin_memory=True) raises."""
    values = np.arange(1000, dtype=np.int64)
    result = to_device(values, torch.int32, "cuda")
    torch.cuda.synchronize()
    assert result.dtype == torch.int32 and result.cpu().tolist() == list(range(1000))
