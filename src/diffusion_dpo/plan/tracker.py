"""Counting live tensor bytes op by op, on fake tensors: the planner's memory simulation.

`LiveBytes` is a TorchDispatchMode: every tensor an ATen op returns is recorded by its storage (views share
one), and a weak reference to the storage takes its bytes off again when the storage is freed. Nothing is
allocated: the networks are built on the meta device (`on_meta`) and their parameters turned into fake CPU
tensors (`fake_module`), so a 12B-parameter step is simulated in seconds with the same kernels' output shapes
and the same autograd bookkeeping (saved tensors, gradient checkpointing, in-place ops) as a real one.

What it does not see: scratch memory an ATen kernel allocates and frees inside one op (a matmul's workspace,
cuDNN or oneDNN buffers), allocator rounding and fragmentation, and the CUDA context (about 0.5-1 GB per
process on a GPU; the planner adds a fixed reserve for it, plan.engines.CONTEXT_BYTES).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("act", "grad", "opt")
"""Live bytes other than the weights: activations and temporaries, parameter gradients, optimizer state (with
the optimizer step's temporaries). The weights are counted apart (`static`): they do not change in a step."""


class LiveBytes(TorchDispatchMode):
    """Live bytes per category after every op (`timeline`), and their peak total (`peak`)."""

    def __init__(self) -> None:
        super().__init__()
        self._cells = WeakIdKeyDictionary()  # storage -> [category, nbytes] (mutable: a grad is re-labelled)
        self._refs: list = []
        self.now = dict.fromkeys(("static", *CATEGORIES), 0)  # static: weights, registered before the step
        self.category = "act"  # what new storages are counted as (set to "opt" around the optimizer step)
        self.timeline: list[tuple[int, int, int]] = []  # (act, grad, opt) after each op that changed them
        self.peak = 0

    def record(self, t: torch.Tensor, category: str | None = None) -> None:
        """Count `t`'s storage (once) under `category` (default: the current one). Weights are recorded as
        "static" before the step, so in-place updates of them (the optimizer's) count nothing new."""
        st = t.untyped_storage()
        if st in self._cells:
            return
        cell = [category or self.category, st.nbytes()]
        self._cells[st] = cell
        self.now[cell[0]] += cell[1]

        def freed(_ref, cell=cell) -> None:
            self.now[cell[0]] -= cell[1]

        self._refs.append(weakref.ref(st, freed))
        self._mark()

    def relabel(self, t: torch.Tensor, category: str) -> None:
        """Count `t`'s storage under `category` from now on (a new .grad is created as an op output: "act")."""
        cell = self._cells.get(t.untyped_storage())
        if cell is not None and cell[0] != category:
            self.now[cell[0]] -= cell[1]
            self.now[category] += cell[1]
            cell[0] = category

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """Count `nbytes` as live activations inside the block (a reference copy moved onto the device for its
        forward: model.reference_on_cpu)."""
        self.now["act"] += nbytes
        self._mark()
        try:
            yield
        finally:
            self.now["act"] -= nbytes

    def _mark(self) -> None:
        point = (self.now["act"], self.now["grad"], self.now["opt"])
        if not self.timeline or self.timeline[-1] != point:
            self.timeline.append(point)
            self.peak = max(self.peak, sum(point))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.record, out)
        self._mark()
        return out


def fake_module(module: torch.nn.Module, fake_mode) -> torch.nn.Module:
    """Replace a meta-device module's parameters and buffers, in place, by fake CPU tensors of `fake_mode`
    (same shapes, dtypes and requires_grad; no memory)."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(FakeTensor(fake_mode, p.data.to("meta"), cpu),
                                                         requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = FakeTensor(fake_mode, b.to("meta"), cpu)
    return module


def tensor_bytes(module: torch.nn.Module, trainable: bool | None = None) -> int:
    """Bytes of a module's parameters and buffers (trainable=True/False: only those parameters, no buffers)."""
    params = [p for p in module.parameters() if trainable is None or p.requires_grad == trainable]
    total = sum(p.numel() * p.element_size() for p in params)
    if trainable is None:
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total
