"""What a training loop needs to run expert-parallel, in one object (issue 5.1; trainer hook).

:class:`ExpertParallelRuntime` bundles the process groups with the handful of calls a trainer makes
differently under ``torchrun``:

* :meth:`build_model` — wrap a model builder: build the single-process model (same seed, so the
  initial weights do not depend on the number of ranks), shard its MoE layers, make every replica
  start identical. A ``locmoe_plus`` option ``scope="global"`` becomes the layers' global routing
  scope (all tokens of the expert-parallel group form one routing group).
* :meth:`local_rows` — this rank's rows of the global batch (every rank draws the same global batch
  from the same loader, so ``--batch-size`` means the same tokens per step on any number of ranks).
* :meth:`finish_backward` — gradient synchronisation and the global gradient norm / clipping.
* :meth:`mean_over_ranks` — one all-reduce of the step's logged scalars.
* :meth:`traffic` — bytes by phase and kind, summed over layers and ranks (forward and backward).
* :meth:`model_state` / :meth:`load_model_state` / :meth:`optimizer_state` /
  :meth:`load_optimizer_state` — checkpoints in the consolidated, rank-count-independent form.
* :attr:`is_writer` — only global rank 0 writes files.

A single process is the same object with :meth:`single_process` (every collective is a no-op), so a
trainer can use it unconditionally.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from locmoe.parallel.checkpoint import (
    consolidated_optimizer_state,
    consolidated_state_dict,
    load_consolidated_optimizer_state,
    load_consolidated_state_dict,
)
from locmoe.parallel.data_parallel import broadcast_parameters, clip_grad_norm, synchronize_gradients
from locmoe.parallel.groups import DEFAULT_TIMEOUT_S, ExpertParallelGroups, init_expert_parallel
from locmoe.parallel.layer import expert_parallel_layers, shard_experts
from locmoe.parallel.timeouts import CollectiveLabel, run_collective
from locmoe.parallel.traffic import KINDS, TrafficCounter


@dataclass
class ExpertParallelRuntime:
    """Process groups plus the trainer-facing calls (module docstring)."""

    groups: ExpertParallelGroups
    hierarchical: bool = False

    @classmethod
    def single_process(cls) -> ExpertParallelRuntime:
        return cls(ExpertParallelGroups.single_process())

    @classmethod
    def start(
        cls,
        expert_parallel: int | None = None,
        *,
        ranks_per_node: int | None = None,
        hierarchical: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        threads: int = 0,
    ) -> ExpertParallelRuntime:
        """Join the ``torchrun`` job and build the groups; each rank uses ``threads`` CPU threads
        (0 = one per rank when several ranks share the machine, else torch's default)."""
        groups = init_expert_parallel(expert_parallel, ranks_per_node=ranks_per_node, timeout_s=timeout_s)
        if threads:
            torch.set_num_threads(threads)
        elif groups.world_size > 1:
            torch.set_num_threads(1)
        return cls(groups, hierarchical)

    @property
    def is_writer(self) -> bool:
        return self.groups.global_rank == 0 if self.groups.world_size > 1 else True

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    def build_model(self, builder: Callable[[Any, int], nn.Module], config: Any, vocab_size: int) -> nn.Module:
        """``builder(config, vocab_size)`` then shard its MoE layers over the expert-parallel group.

        ``config`` is the trainer's frozen model config; a ``router_options["scope"] == "global"``
        is replaced by ``"batch"`` for the router and becomes the layers' ``routing_scope``."""
        routing_scope = "local"
        options = dict(getattr(config, "router_options", {}) or {})
        if options.get("scope") == "global":
            options["scope"] = "batch"
            config = dataclasses.replace(config, router_options=options)
            routing_scope = "global"
        model = builder(config, vocab_size)
        shard_experts(model, self.groups, hierarchical=self.hierarchical, routing_scope=routing_scope)
        broadcast_parameters(model, self.groups)
        return model

    def local_rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This data-parallel rank's contiguous share of the rows of each global-batch tensor."""
        world, rank = self.groups.world_size, self.groups.global_rank
        sliced = []
        for tensor in tensors:
            if tensor.shape[0] % world != 0:
                raise ValueError(
                    f"the global batch of {tensor.shape[0]} sequences does not split over {world} ranks; "
                    f"choose a batch size that is a multiple of {world}"
                )
            rows = tensor.shape[0] // world
            sliced.append(tensor[rank * rows : (rank + 1) * rows])
        return tuple(sliced)

    def set_step(self, model: nn.Module, step: int) -> None:
        """Name ``step`` (1-based) in collective error messages of the next forward/backward."""
        for layer in expert_parallel_layers(model).values():
            layer.step = step - 1 if layer.training else step  # a training forward counts itself

    def finish_backward(self, model: nn.Module, max_norm: float, step: int = 0) -> torch.Tensor:
        """Average gradients over ranks (module :mod:`~locmoe.parallel.data_parallel`), clip by the
        global norm; returns that norm (what ``clip_grad_norm_`` returns in one process)."""
        synchronize_gradients(model, self.groups, step=step)
        return clip_grad_norm(model, self.groups, max_norm, step=step)

    def mean_over_ranks(self, values: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Mean of a tensor over all ranks (one all-reduce); the tensor itself in one process."""
        if self.groups.data_group is None:
            return values
        total = values.detach().clone()
        run_collective(
            lambda: dist.all_reduce(total, group=self.groups.data_group, async_op=True),
            CollectiveLabel("training loop", step, "metric all-reduce"),
            self.groups.timeout_s,
            self.groups.global_rank,
        )
        return total / self.groups.world_size

    def traffic(self, model: nn.Module, step: int = 0) -> dict[str, int]:
        """``{phase}_bytes_{kind}`` summed over the MoE layers and all ranks for the last step
        (forward and backward), plus ``inter_node_bytes`` / ``intra_node_bytes`` of dispatch and
        combine (forward and backward). One all-reduce."""
        counter = TrafficCounter()
        for layer in expert_parallel_layers(model).values():
            counter.merge(layer.traffic)
        phases = sorted(counter.bytes)
        names = [f"{phase}_bytes_{kind}" for phase in phases for kind in KINDS]
        values = torch.tensor([counter.bytes[phase][kind] for phase in phases for kind in KINDS], dtype=torch.float64)
        # Every rank runs the same layers, so the phase lists agree; the sum is then elementwise.
        summed = self.mean_over_ranks(values, step) * self.groups.world_size if names else values
        totals = {name: int(round(float(v))) for name, v in zip(names, summed.tolist(), strict=True)}
        moved = ("dispatch", "combine", "dispatch_grad", "combine_grad")
        for kind in ("inter_node", "intra_node"):
            totals[f"{kind}_bytes"] = sum(totals.get(f"{phase}_bytes_{kind}", 0) for phase in moved)
        return totals

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """Consolidated model state (collective; every rank calls, the writer saves)."""
        return consolidated_state_dict(model, self.groups)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Consolidated optimiser state keyed by parameter name (collective)."""
        return consolidated_optimizer_state(model, optimizer, self.groups)

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        load_consolidated_state_dict(model, state, self.groups)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        load_consolidated_optimizer_state(model, optimizer, state)
