"""Helpers shared by the launchers: output allocation (one seam, so tests can poison outputs with NaN before a
launch and catch an element a kernel forgot to write), grid sizing and dtype checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: dtypes the kernels load and convert to float32 in registers (any mix within one call)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def new_output(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every launcher allocates its outputs here; the contents are undefined until the kernel writes them."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def check_float(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {tensor.dtype}")


def persistent_programs(device: torch.device) -> int:
    """Programs for grid-stride kernels: a few waves on a GPU, a handful under the CPU interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
