"""Tensors and dtypes between Paddle and PyTorch.

Tensors cross by DLPack: a CPU tensor is shared, not copied, in both directions (the capsule
keeps the other framework's memory alive). numpy arrays are shared through
``torch.from_numpy`` where numpy allows it (writable, non-negative strides).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import torch

#: Paddle's DataType names (``paddle.float32.name`` == ``"FLOAT32"``) -> torch dtypes
_BY_NAME: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "FLOAT16": torch.float16,
    "BFLOAT16": torch.bfloat16,
    "FLOAT32": torch.float32,
    "FLOAT64": torch.float64,
    "COMPLEX64": torch.complex64,
    "COMPLEX128": torch.complex128,
    "FLOAT8_E4M3FN": torch.float8_e4m3fn,
    "FLOAT8_E5M2": torch.float8_e5m2,
}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a Paddle dtype (``paddle.float32``, a PIR ``DataType`` attribute, or
    a name such as ``"float32"``); ValueError for one torch has no counterpart of."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = getattr(dtype, "name", None)
    if name is None:
        name = str(dtype).rsplit(".", 1)[-1]
    found = _BY_NAME.get(str(name).upper())
    if found is None:
        raise ValueError(f"no torch dtype for Paddle dtype {dtype!r}")
    return found


def is_integral(dtype: torch.dtype) -> bool:
    """Whether `dtype` holds integers (bool excluded): Paddle's integer kernel semantics apply."""
    return not dtype.is_floating_point and not dtype.is_complex and dtype is not torch.bool


def to_torch(t: paddle.Tensor | np.ndarray | torch.Tensor,
             device: torch.device | str | None = None) -> torch.Tensor:
    """`t` as a torch tensor, on `device` when given (else where it is).

    A CPU Paddle tensor and a numpy array are shared with the result, not copied (DLPack,
    ``torch.from_numpy``); moving to another device copies, as it must. Read-only or
    negatively strided numpy arrays are copied once (torch cannot share them).
    """
    if isinstance(t, torch.Tensor):
        out = t
    elif isinstance(t, paddle.Tensor):
        out = torch.from_dlpack(t)
    else:
        arr = np.asarray(t)
        if not arr.flags.writeable or any(s < 0 for s in arr.strides):
            arr = np.array(arr)
        out = torch.from_numpy(arr)
    if device is not None:
        out = out.to(device)
    return out


def to_paddle(t: torch.Tensor) -> paddle.Tensor:
    """`t` as a CPU Paddle tensor (shared through DLPack when `t` is a contiguous CPU tensor;
    a device tensor is copied to the host first)."""
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return paddle.utils.dlpack.from_dlpack(t)
