"""Counting the bytes torch operators allocate, exactly, on any device: the peak of what is alive at once.

Resident-set sizes mix in the allocator's caching and the interpreter; for a function's own temporaries this count is
exact. Used by ``benchmarks/memory.py`` and by the tests that bound a function's temporaries.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """While active, tracks the bytes of the tensors operators create, as long as they are alive, and their peak.

    Results that share an input's storage (views, in-place results) are not counted, nor are tensors that existed
    before the mode was entered: ``peak`` is the most temporary memory the code inside held at once.

    Example:
        >>> x = torch.zeros(1024)
        >>> with LiveTensorBytes() as tracker:
        ...     y = (x + 1) * 2  # x + 1 (4 KiB) is alive while its product (4 KiB) is made
        >>> tracker.peak
        8192
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                size = t.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, size)
        return out

    def _release(self, size: int) -> None:
        self.live -= size
