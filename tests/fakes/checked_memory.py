"""Triton's interpreter made to fail a kernel's read or write outside the tensors passed to it:
on a GPU such an access is an illegal-address error that ends the CUDA context, or a silent
read of another buffer. Only where the interpreter runs the kernels (no GPU)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


@contextmanager
def checked_memory() -> Iterator[list[str]]:
    """Within, every load and store of an interpreted kernel checks the addresses of its active
    (unmasked) elements against the extents of the launch's tensor arguments; yields the names
    of the kernels launched."""
    launched: list[str] = []
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield launched
        return
    from triton.runtime import interpreter

    extents: list[tuple[int, int]] = []
    builder = interpreter.interpreter_builder
    init, load, store = (
        interpreter.GridExecutor._init_args_hst,
        builder.create_masked_load,
        builder.create_masked_store,
    )

    def init_checked(self, args_dev, kwargs):
        args, kwargs_hst = init(self, args_dev, kwargs)
        extents.clear()
        for arg in [*args, *kwargs_hst.values()]:
            for tensor in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(tensor, torch.Tensor):
                    end = tensor.data_ptr() + _span(tensor) * tensor.element_size()
                    extents.append((tensor.data_ptr(), end))
        launched.append(self.fn.__name__)
        return args, kwargs_hst

    def check(ptrs, mask, what: str) -> None:
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in extents:
            inside |= (addresses >= start) & (addresses + size <= end)
        if not inside.all():
            raise OutOfBounds(f"a {what} of {int((~inside).sum())} element(s) outside every tensor")

    # (the arguments after these differ between Triton versions)
    def load_checked(ptrs, mask, *rest):
        check(ptrs, mask, "load")
        return load(ptrs, mask, *rest)

    def store_checked(ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return store(ptrs, value, mask, *rest)

    interpreter.GridExecutor._init_args_hst = init_checked
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    try:
        yield launched
    finally:
        interpreter.GridExecutor._init_args_hst = init
        builder.create_masked_load, builder.create_masked_store = load, store


def _span(tensor: torch.Tensor) -> int:
    """Elements from a tensor's first to its last, inclusive (0 if empty)."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
