"""Expert-sharded state ⇄ global expert ids (design §5).

On a rank, an :func:`sharded <locmoe.parallel.shard.shard_layer>` ``MoELayer`` holds experts
``[r·n/P, (r+1)·n/P)`` and records their global ids in its ``expert_ids`` buffer, so every state dict
says which experts it holds. Two ways to a checkpoint any number of ranks can resume from:

* :func:`consolidated_state_dict` (collective): the model's state with every layer's expert shards
  gathered into full ``(n, …)`` tensors in global expert order and ``expert_ids = arange(n)``; the
  keys are those of the single-process model (plus ``expert_ids``). Rank 0 saves it.
* :func:`merge_expert_shards` (offline): the same from the per-rank ``model.state_dict()`` files.

:func:`load_consolidated_state_dict` then keeps the block each rank of the *new* run holds, on any
number of ranks (or one process, sharded or not). It refuses a state whose experts do not match the
model's: a different number of experts, missing or duplicated ids (e.g. one rank's shard), or
expert tensors of another shape. :func:`consolidated_optimizer_state` /
:func:`load_consolidated_optimizer_state` do the same for the optimiser (state keyed by parameter
name; per-parameter tensors shaped like an expert parameter are gathered and split like it).

Router buffers (e.g. the LocMoE fixed capacity) are taken from rank 0: with local routing scope a
stateful router may hold a different state on each rank, which a run on another number of ranks
cannot reproduce exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from locmoe.layer import MoELayer, find_moe_layers
from locmoe.parallel.data_parallel import is_expert_parameter
from locmoe.parallel.groups import ExpertParallelGroups
from locmoe.parallel.shard import is_sharded
from locmoe.parallel.timeouts import CollectiveLabel, run_collective

EXPERT_IDS = "expert_ids"


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def _gather_blocks(shard: torch.Tensor, groups: ExpertParallelGroups, what: str) -> torch.Tensor:
    """All-gather equal-size expert blocks over the expert-parallel group: ``(P·n/P, …)`` in group order."""
    if groups.expert_group is None:
        return shard
    shard = shard.contiguous()
    blocks = [torch.empty_like(shard) for _ in range(groups.size)]
    run_collective(
        lambda: dist.all_gather(blocks, shard, group=groups.expert_group, async_op=True),
        CollectiveLabel(what, 0, "checkpoint gather"),
        groups.timeout_s,
        groups.global_rank,
    )
    return torch.cat(blocks)


def _check_expert_ids(path: str, ids: torch.Tensor, num_experts: int) -> None:
    expected = torch.arange(num_experts)
    if ids.dim() != 1 or ids.numel() != num_experts or not torch.equal(ids.cpu().long().sort().values, expected):
        raise ValueError(
            f"checkpoint layer {path or '(model)'!r} holds experts {ids.tolist()}, but the model's layer has "
            f"{num_experts} experts (ids 0..{num_experts - 1}); refusing a checkpoint whose experts do not match"
        )


def consolidated_state_dict(model: nn.Module, groups: ExpertParallelGroups | None = None) -> dict[str, Any]:
    """``model.state_dict()`` with all experts of every sharded layer gathered (collective), and the
    global expert ids of every MoE layer (``arange(n)`` for an unsharded one, which holds them all)."""
    groups = groups or ExpertParallelGroups.single_process()
    state = dict(model.state_dict())
    for path, layer in find_moe_layers(model).items():
        if not is_sharded(layer):
            state[f"{_prefix(path)}{EXPERT_IDS}"] = torch.arange(layer.num_experts)
            continue
        prefix = _prefix(path)
        ids = _gather_blocks(layer.expert_ids, groups, path)
        _check_expert_ids(path, ids, layer.num_experts)
        order = torch.argsort(ids)
        for name, parameter in layer.experts.named_parameters():
            state[f"{prefix}experts.{name}"] = _gather_blocks(parameter.detach(), groups, path)[order]
        state[f"{prefix}{EXPERT_IDS}"] = torch.arange(layer.num_experts)
    return state


def merge_expert_shards(shards: list[dict[str, Any]], num_experts: int | None = None) -> dict[str, Any]:
    """Merge per-rank ``state_dict()`` s of one expert-parallel group into a consolidated state.

    Non-expert entries come from the first shard. ``ValueError`` if some expert is held twice, the
    ids are not ``0..m-1`` (``m = num_experts`` when given, else the number of experts found: without
    it, the shards of the first ranks alone look like a smaller whole layer, which
    :func:`load_consolidated_state_dict` then refuses), or the shards disagree on their layers."""
    if not shards:
        raise ValueError("no shards to merge")
    layer_keys = [key for key in shards[0] if key == EXPERT_IDS or key.endswith(f".{EXPERT_IDS}")]
    merged = dict(shards[0])
    for key in layer_keys:
        prefix = key[: -len(EXPERT_IDS)]
        if any(key not in shard for shard in shards):
            raise ValueError(f"shards disagree: not all of them hold layer {prefix[:-1]!r}")
        ids = torch.cat([shard[key].long() for shard in shards])
        _check_expert_ids(prefix[:-1], ids, ids.numel() if num_experts is None else num_experts)
        order = torch.argsort(ids)
        for name in [k for k in shards[0] if k.startswith(f"{prefix}experts.")]:
            merged[name] = torch.cat([shard[name] for shard in shards])[order]
        merged[key] = torch.arange(ids.numel())
    return merged


def load_consolidated_state_dict(
    model: nn.Module, state: dict[str, Any], groups: ExpertParallelGroups | None = None, *, strict: bool = True
) -> None:
    """Load a consolidated (or single-process) state into ``model`` on any number of ranks.

    Each MoE layer's experts are checked against the model (number, ids, shapes) and sharded layers
    keep their own block. Not collective."""
    state = dict(state)
    for path, layer in find_moe_layers(model).items():
        prefix = _prefix(path)
        expert_keys = {name: f"{prefix}experts.{name}" for name, _ in layer.experts.named_parameters()}
        missing = [key for key in expert_keys.values() if key not in state]
        if missing:
            raise ValueError(f"checkpoint has no experts for layer {path!r} (missing {', '.join(missing)})")
        held = state[expert_keys["w_in"]].shape[0]
        ids = state.pop(f"{prefix}{EXPERT_IDS}", torch.arange(held))
        _check_expert_ids(path, torch.as_tensor(ids), layer.num_experts)
        order = torch.argsort(torch.as_tensor(ids).long())
        block = layer.expert_ids
        for name, key in expert_keys.items():
            full = state[key][order]
            expected = (layer.num_experts, *getattr(layer.experts, name).shape[1:])
            if tuple(full.shape) != expected:
                raise ValueError(
                    f"checkpoint layer {path!r}: experts.{name} has shape {tuple(full.shape)}, the model expects "
                    f"{expected}; refusing a checkpoint whose experts do not match"
                )
            state[key] = full[block.cpu()]
        if is_sharded(layer):
            state[f"{prefix}{EXPERT_IDS}"] = layer.expert_ids.clone()
    model.load_state_dict(state, strict=strict)


def _expert_parameter_layers(model: nn.Module) -> dict[str, tuple[str, MoELayer]]:
    """Parameter name -> (layer path, layer) for every expert parameter (sharded or not)."""
    owners = {}
    for path, layer in find_moe_layers(model).items():
        for name, _ in layer.experts.named_parameters():
            owners[f"{_prefix(path)}experts.{name}"] = (path, layer)
    return owners


def _is_expert_shaped(value: object, shape: tuple[int, ...]) -> bool:
    return isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(shape)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds parameters that are not the model's") from None


def consolidated_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, groups: ExpertParallelGroups | None = None
) -> dict[str, Any]:
    """The optimiser's state keyed by parameter name, expert tensors gathered (collective).

    Returns ``{"param_groups": [...hyper-parameters and "param_names"...], "state": {name: {...}}}``."""
    groups = groups or ExpertParallelGroups.single_process()
    saved = optimizer.state_dict()
    group_names = _parameter_names(model, optimizer)
    parameters = dict(model.named_parameters())
    owners = _expert_parameter_layers(model)
    param_groups = []
    for group, names in zip(saved["param_groups"], group_names, strict=True):
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "param_names": names})
    state: dict[str, dict[str, Any]] = {}
    flat_names = [name for names in group_names for name in names]
    for index, name in enumerate(flat_names):
        entry = saved["state"].get(index)
        if is_expert_parameter(parameters[name]):
            # Every rank must take part in the gathers, including ranks that have no state yet.
            if entry is None:
                raise ValueError(f"optimizer has no state for expert parameter {name!r}; save after a step")
            path, layer = owners[name]
            ids = _gather_blocks(layer.expert_ids, groups, path)
            order = torch.argsort(ids)
            entry = {
                key: _gather_blocks(value, groups, path)[order]
                if isinstance(value, torch.Tensor) and value.shape == parameters[name].shape
                else value
                for key, value in entry.items()
            }
        if entry is not None:
            state[name] = entry
    return {"param_groups": param_groups, "state": state}


def load_consolidated_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Load :func:`consolidated_optimizer_state` output into ``optimizer`` (any number of ranks).
    The parameter groups must hold the same parameter names in the same order."""
    group_names = _parameter_names(model, optimizer)
    saved_names = [group["param_names"] for group in saved["param_groups"]]
    if saved_names != group_names:
        raise ValueError("the checkpoint's optimizer parameter groups do not match this model's parameters")
    parameters = dict(model.named_parameters())
    owners = _expert_parameter_layers(model)
    state: dict[int, dict[str, Any]] = {}
    flat_names = [name for names in group_names for name in names]
    for index, name in enumerate(flat_names):
        entry = saved["state"].get(name)
        if entry is None:
            continue
        if name in owners:
            _, layer = owners[name]
            block = layer.expert_ids
            full_shape = (layer.num_experts, *parameters[name].shape[1:])
            entry = {
                key: value[block.cpu()] if _is_expert_shaped(value, full_shape) else value
                for key, value in entry.items()
            }
        state[index] = entry
    param_groups = []
    offset = 0
    for group in saved["param_groups"]:
        count = len(group["param_names"])
        hyper = {k: v for k, v in group.items() if k != "param_names"}
        param_groups.append({**hyper, "params": list(range(offset, offset + count))})
        offset += count
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
