"""``train.init_from``: start a run from the weights of another run's checkpoint (design §9.2).

A continued run (domain adaptation: pretrain on one corpus, continue on another) keeps every weight
outside the routers and, with ``train.init_router="matching"``, the router tensors that fit; the
trainer tokenises its corpus with that checkpoint's tokenizer (:class:`locmoe.config.TrainConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from locmoe.layer import find_moe_layers
from locmoe.parallel.runtime import ExpertParallelRuntime


def initialise_from(
    model: nn.Module, runtime: ExpertParallelRuntime, init_router: str, path: Path, saved: dict[str, Any]
) -> None:
    """``train.init_from``: start ``model`` from the weights of another run's checkpoint ``saved`` (read
    from ``path``): every weight outside the routers, and the router tensors ``init_router``
    (``train.init_router``) keeps (:class:`locmoe.config.TrainConfig`; the data already uses its
    tokenizer). ``ValueError`` naming what does not fit."""
    routers = tuple(f"{name}.router." for name in find_moe_layers(model))
    kept = {key: value for key, value in saved["model"].items() if not key.startswith(routers)}
    missing = sorted(key for key in model.state_dict() if not key.startswith(routers) and key not in kept)
    if missing:
        raise ValueError(f"cannot initialise from {path}: it has no {', '.join(missing[:5])}"
                         f"{' …' if len(missing) > 5 else ''} (a model of another shape)")
    if init_router == "matching":
        kept.update(matching_router_tensors(model.state_dict(), saved["model"], routers))
    try:
        runtime.load_model_state(model, kept, strict=False)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"cannot initialise from {path}: {str(error).splitlines()[0]}") from None


def matching_router_tensors(
    own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The router tensors of ``saved`` (keys under ``prefixes``) that ``own`` holds under the same
    name, shape and dtype: what ``init_router="matching"`` carries over."""
    return {
        key: value for key, value in saved.items()
        if key.startswith(prefixes) and key in own
        and tuple(own[key].shape) == tuple(value.shape) and own[key].dtype == value.dtype
    }
