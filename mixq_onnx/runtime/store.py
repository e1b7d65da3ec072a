"""Activations by tensor name, held in memory up to a budget and memory-mapped from scratch files beyond it.

Block reconstruction and the block-wise evaluator both keep every sample's
value of the tensors that cross block boundaries; on a large model with
many samples those do not fit in memory, so what is over the budget is
written once to ``.npy`` files and read back as memory maps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import helper

Shape = tuple[int | str, ...]


class ActivationStore:
    """Per-sample activations by tensor name; arrays beyond the memory budget go to memory-mapped files."""

    def __init__(self, budget_bytes: int, folder: Path | Callable[[], Path]) -> None:
        """``folder``: where spilled arrays go, or a function that makes it at the first spill (most runs need none)."""
        self.budget = budget_bytes
        self._folder = folder
        self.in_memory = 0
        self.spilled = 0
        self.values: dict[str, list[np.ndarray]] = {}
        self._held: dict[str, int] = {}  # bytes this store holds in memory, by name
        self._files = 0

    def put(self, name: str, arrays: list[np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays)
        if self.in_memory + size <= self.budget:
            self.in_memory += size
            self._held[name] = size
            self.values[name] = arrays
            return
        path = self.folder / f"{self._files}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._files += 1
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
        np.save(path, flat)
        mapped = np.load(path, mmap_mode="r")
        out, at = [], 0
        for a in arrays:
            out.append(mapped[at : at + a.size].reshape(a.shape))
            at += a.size
        self.spilled += size
        self.values[name] = out

    def __getstate__(self) -> dict[str, object]:
        # Sent to a worker to be read: a folder still to be made (a function) does not travel, nor is it needed there.
        return {**self.__dict__, "_folder": None if callable(self._folder) else self._folder}

    @property
    def folder(self) -> Path:
        if callable(self._folder):
            self._folder = self._folder()
        return self._folder

    def share(self, name: str, other: "ActivationStore") -> None:
        """Use ``other``'s arrays for ``name`` (the tensor is the same in both models)."""
        self.values[name] = other.values[name]

    def drop(self, name: str) -> None:
        self.values.pop(name, None)
        self.in_memory -= self._held.pop(name, 0)


def tensor_info(arrays: list[np.ndarray]) -> tuple[int, Shape]:
    """Element type and shape over all samples: a dimension that varies gets a name."""
    first = arrays[0]
    dims: list[int | str] = list(first.shape)
    for a in arrays[1:]:
        for d, (x, y) in enumerate(zip(first.shape, a.shape)):
            if x != y:
                dims[d] = f"d{d}"
    return helper.np_dtype_to_tensor_dtype(first.dtype), tuple(dims)


__all__ = ["ActivationStore", "Shape", "tensor_info"]
