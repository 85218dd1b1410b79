"""Where a run computes and at what precision: device, autocast, determinism (design §5).

``train.device`` is ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` (under
``torchrun``: the GPU of this rank's ``LOCAL_RANK``) or ``"cuda:N"``. ``train.precision`` is ``"auto"``
(bf16 mixed precision on CUDA, float32 on the CPU, where bf16 is emulated on most CPUs and slower),
``"float32"`` or ``"bfloat16"``. Nothing here imports the rest of locmoe.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
PRECISIONS = ("auto", "float32", "bfloat16")
_CUDA = re.compile(r"cuda(:(\d+))?")


def check_device_text(text: object) -> None:
    """``ValueError`` unless ``text`` is one of ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (it may name a
    device this machine lacks: that is checked when the run starts, by :func:`resolve_device`)."""
    if not isinstance(text, str) or not (text in ("auto", "cpu") or _CUDA.fullmatch(text)):
        raise ValueError(f"train.device={text!r} is invalid; allowed: {DEVICE_CHOICES}")


def resolve_device(text: str, local_rank: int | None = None) -> torch.device:
    """The device ``text`` names on this machine. ``"cuda"`` without an index takes ``local_rank``
    (``torchrun``'s ``LOCAL_RANK``) or 0. ``ValueError`` naming the value if CUDA is asked for and
    absent, or the index is out of range."""
    check_device_text(text)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"train.device={text!r} but this torch sees no CUDA device; allowed here: auto, cpu")
    index = _CUDA.fullmatch(text).group(2)  # type: ignore[union-attr]
    index = int(index) if index is not None else (local_rank or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"train.device={text!r} names GPU {index}; this machine has {count} (0..{count - 1})")
    return torch.device("cuda", index)


def local_rank() -> int | None:
    """``torchrun``'s ``LOCAL_RANK``, if set."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None and value.isdigit() else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bfloat16"`` on CUDA, ``"float32"`` elsewhere; the others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is invalid; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return precision


def forward_precision(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The context of a forward pass: nothing for float32, ``torch.autocast`` on ``device``'s type to
    bf16 for bfloat16 (matrix products in bf16; weights, gradients, optimiser state, norms, softmax,
    the loss and the routers' logits stay float32). Backward runs outside it, as autocast wants."""
    device_type = torch.device(device).type
    precision = resolve_precision(precision, torch.device(device))
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, precision))


def use_deterministic_algorithms(enabled: bool) -> None:
    """``train.deterministic`` (``enabled``; ``False`` changes nothing): deterministic kernels where
    torch has them (a warning where it has not) and cuBLAS's deterministic workspace, so a resumed
    CUDA run repeats an uninterrupted one. Call it before CUDA is first used: cuBLAS reads the
    workspace setting when it starts."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor bound for CUDA goes through pinned memory, so the copy
    is asynchronous (the kernels that use it queue behind it on the same stream)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
