"""Counting host synchronisations on the CPU, where there is no device to wait for.

A host synchronisation is the host needing a value the device computes: ``item()`` / ``int()`` /
``bool()`` / ``float()`` of a tensor (``aten::_local_scalar_dense``), ``tolist()`` / ``numpy()``, and
ops whose output size depends on the data (``nonzero``, ``masked_select``, boolean indexing,
``unique``, ``repeat_interleave`` without ``output_size``). On the CPU these cost nothing, but each
one stalls a GPU pipeline, so we count them where they happen: a dispatch mode sees the aten calls,
and ``Tensor.tolist`` / ``Tensor.numpy`` (which do not dispatch for CPU tensors) are wrapped. Each
synchronisation is attributed to the innermost locmoe function on the stack.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "_local_scalar_dense"}


def _site() -> str:
    """``module:function`` of the innermost locmoe frame calling in."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("locmoe"):
            return f"{name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "outside locmoe"


class HostSyncs(TorchDispatchMode):
    """The synchronisations seen while active, by site (:func:`_site`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = name in _DATA_DEPENDENT
        if name == "repeat_interleave" and len(args) == 1 and kwargs.get("output_size") is None:
            syncs = True
        if name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            syncs = True
        if syncs:
            self.sites[_site()] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    counter = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str):  # noqa: ANN202
        original = originals[name]

        def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN202
            counter.sites[_site()] += 1
            return original(self, *args, **kwargs)

        return wrapped

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
