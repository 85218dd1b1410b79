"""What a training loop needs to run expert-parallel, in one object (design §5; the trainer's hook).

:class:`ExpertParallelRuntime` bundles the process groups with the handful of calls a trainer makes
differently under ``torchrun``:

* :meth:`build_model` — wrap a model builder: build the single-process model (same seed, so the
  initial weights do not depend on the number of ranks), shard its MoE layers, make every replica
  start identical. ``model.routing_scope="global"`` makes all tokens of the expert-parallel group one
  routing group (in one process, the batch).
* :meth:`local_rows` — this rank's rows of the global batch (every rank draws the same global batch
  from the same loader, so ``--batch-size`` means the same tokens per step on any number of ranks).
* :meth:`token_nodes` — the node of every token under simulated nodes (one process), else ``None``.
* :meth:`finish_backward` — gradient synchronisation and the global gradient norm / clipping.
* :meth:`mean_over_ranks` / :meth:`sum_over_ranks` / :meth:`max_over_ranks` — one all-reduce each
  (the step's logged scalars, evaluation totals, the stop request).
* :meth:`routing_metrics` — every MoE layer's metrics merged over the ranks
  (:func:`locmoe.parallel.rank_metrics.merge_rank_metrics`).
* :meth:`traffic` — bytes by phase and kind, summed over layers and ranks (forward and backward).
* :meth:`model_state` / :meth:`load_model_state` / :meth:`optimizer_state` /
  :meth:`load_optimizer_state` — checkpoints in the consolidated, rank-count-independent form.
* :attr:`is_writer` — only global rank 0 writes files; :meth:`writer_first` runs an action (filling
  a cache) on it before the others; :meth:`barrier`; :meth:`close`.

A single process is the same object with :meth:`single_process` (every collective is a no-op and
the model is not sharded, so it runs exactly the plain :class:`~locmoe.layer.MoELayer`), so a trainer
can use it unconditionally. ``single_process(simulated_nodes=N)`` **(ours)** places the experts on
``N`` simulated nodes like ``N`` single-rank nodes would hold them, and :meth:`token_nodes` places
the tokens, so the routers' locality loss and ``remote_share`` see a topology in one process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from locmoe.layer import find_moe_layers
from locmoe.parallel.checkpoint import (
    consolidated_optimizer_state,
    consolidated_state_dict,
    load_consolidated_optimizer_state,
    load_consolidated_state_dict,
)
from locmoe.parallel.data_parallel import broadcast_parameters, clip_grad_norm, synchronize_gradients
from locmoe.parallel.groups import DEFAULT_TIMEOUT_S, ExpertParallelGroups, init_expert_parallel
from locmoe.parallel.rank_metrics import merge_rank_metrics
from locmoe.parallel.shard import expert_parallel_layers, shard_experts
from locmoe.parallel.timeouts import CollectiveLabel, run_collective
from locmoe.parallel.topology import Topology
from locmoe.parallel.traffic import KINDS, TrafficCounter
from locmoe.validation import check_integer

Result = TypeVar("Result")


@dataclass
class ExpertParallelRuntime:
    """Process groups plus the trainer-facing calls (module docstring).

    Attributes:
        groups: the process groups (single-process groups for one process).
        hierarchical: the MoE layers use the hierarchical all-to-all.
        simulated_nodes: ``N`` > 0 simulates ``N`` nodes in one process (module docstring).
        owns_process_group: :meth:`start` initialised the default process group, so :meth:`close`
            destroys it.
        device: where the model computes (:meth:`build_model` moves it there before sharding).
    """

    groups: ExpertParallelGroups
    hierarchical: bool = False
    simulated_nodes: int = 0
    owns_process_group: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def single_process(cls, simulated_nodes: int = 0) -> ExpertParallelRuntime:
        """One process; ``simulated_nodes`` > 0 places experts and tokens on that many simulated nodes."""
        check_integer("simulated_nodes", simulated_nodes, low=0)
        return cls(ExpertParallelGroups.single_process(), simulated_nodes=simulated_nodes)

    @classmethod
    def start(
        cls,
        expert_parallel: int | None = None,
        *,
        ranks_per_node: int | None = None,
        hierarchical: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        threads: int = 0,
        backend: str | None = None,
    ) -> ExpertParallelRuntime:
        """Join the ``torchrun`` job (or, without ``WORLD_SIZE`` in the environment, run as one
        process) and build the groups; each rank uses ``threads`` CPU threads (0 = what
        ``OMP_NUM_THREADS`` says if it is set, else one per rank when there are several ranks, else
        torch's default). ``backend``: see :func:`~locmoe.parallel.groups.init_expert_parallel`."""
        owns = not dist.is_initialized() and "WORLD_SIZE" in os.environ
        groups = init_expert_parallel(
            expert_parallel, ranks_per_node=ranks_per_node, timeout_s=timeout_s, backend=backend
        )
        if threads:
            torch.set_num_threads(threads)
        elif groups.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
        return cls(groups, hierarchical, owns_process_group=owns)

    def close(self) -> None:
        """Destroy the default process group if :meth:`start` created it (not collective)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    @property
    def is_writer(self) -> bool:
        return self.groups.global_rank == 0 if self.groups.world_size > 1 else True

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    def build_model(self, builder: Callable[[Any, int], nn.Module], config: Any, vocab_size: int) -> nn.Module:
        """``builder(config, vocab_size)`` then, with several ranks, shard its MoE layers over the
        expert-parallel group and make every replica start identical.

        Each layer keeps its ``routing_scope`` (``model.routing_scope``); in one process the batch is
        the whole group. One process keeps the plain layers; with simulated nodes they learn where
        their experts live."""
        model = builder(config, vocab_size).to(self.device)  # built on the CPU: the same init everywhere
        if self.world_size > 1:
            shard_experts(model, self.groups, hierarchical=self.hierarchical)
            broadcast_parameters(model, self.groups)
        elif self.simulated_nodes:
            # N single-rank nodes: expert e on node e // (n / N), as N ranks would hold them.
            nodes = Topology(tuple(range(self.simulated_nodes)), 1)
            for module in find_moe_layers(model).values():
                module.set_expert_nodes(nodes.expert_nodes(module.num_experts))
        return model

    def token_nodes(self, inputs: torch.Tensor, stream_fraction: torch.Tensor | None = None) -> torch.Tensor | None:
        """``inputs (B, T)`` -> the simulated node of every token ``(B, T)`` int64, or ``None`` without
        simulated nodes (expert-parallel layers place a rank's tokens on its node themselves).

        Row ``b`` lives on node ``b // (B / N)`` (contiguous blocks, like ``N`` single-rank nodes), or,
        given ``stream_fraction (B,)`` in ``[0, 1)`` (where each row's text starts in the training
        stream), on node ``floor(fraction · N)``: the node holding that shard of the data."""
        if not self.simulated_nodes:
            return None
        rows, nodes = inputs.shape[0], self.simulated_nodes
        if stream_fraction is None:
            if rows % nodes:
                raise ValueError(f"the batch of {rows} rows does not split over {nodes} simulated nodes")
            row_nodes = torch.arange(rows, device=inputs.device) // (rows // nodes)
        else:
            row_nodes = (stream_fraction.to(torch.float64) * nodes).floor().long().clamp(0, nodes - 1)
        return row_nodes.to(inputs.device)[:, None].expand(inputs.shape)

    def local_rows(self, *tensors: torch.Tensor, even: bool = True) -> tuple[torch.Tensor, ...]:
        """This data-parallel rank's contiguous share of the rows of each global-batch tensor.

        ``even=False`` accepts a row count the ranks do not divide (``torch.tensor_split``: the first
        ranks take one row more; a rank may get none), e.g. the last validation batch."""
        world, rank = self.groups.world_size, self.groups.global_rank
        if not even:
            return tuple(torch.tensor_split(tensor, world)[rank] for tensor in tensors)
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
            layer.dispatcher.step = step - 1 if layer.training else step  # a training forward counts itself

    def finish_backward(self, model: nn.Module, max_norm: float, step: int = 0) -> torch.Tensor:
        """Average gradients over ranks (module :mod:`~locmoe.parallel.data_parallel`), clip by the
        global norm; returns that norm. In one process this is ``torch.nn.utils.clip_grad_norm_``
        itself (nothing to synchronise; a parameter without a gradient keeps none)."""
        if self.groups.data_group is None:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        synchronize_gradients(model, self.groups, step=step)
        return clip_grad_norm(model, self.groups, max_norm, step=step)

    def _all_reduce(self, values: torch.Tensor, step: int, what: str, op: Any = None) -> torch.Tensor:
        total = values.detach().clone()
        op = dist.ReduceOp.SUM if op is None else op
        run_collective(
            lambda: dist.all_reduce(total, op=op, group=self.groups.data_group, async_op=True),
            CollectiveLabel("training loop", step, what),
            self.groups.timeout_s,
            self.groups.global_rank,
        )
        return total

    def sum_over_ranks(self, values: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Sum of a tensor over all ranks (one all-reduce); the tensor itself in one process."""
        if self.groups.data_group is None:
            return values
        return self._all_reduce(values, step, "sum all-reduce")

    def mean_over_ranks(self, values: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Mean of a tensor over all ranks (one all-reduce); the tensor itself in one process."""
        if self.groups.data_group is None:
            return values
        return self._all_reduce(values, step, "metric all-reduce") / self.groups.world_size

    def max_over_ranks(self, value: int, step: int = 0) -> int:
        """The largest of an integer over all ranks (e.g. a stop request, so every rank stops at the
        same step); the value itself in one process."""
        if self.groups.data_group is None:
            return value
        reduced = self._all_reduce(torch.tensor([value], dtype=torch.int64), step, "stop agreement", dist.ReduceOp.MAX)
        return int(reduced[0])

    def barrier(self, what: str = "barrier", step: int = 0) -> None:
        """Every rank waits here for the others (e.g. all have read the run's files before the
        writer rewrites them)."""
        if self.groups.data_group is not None:
            self._all_reduce(torch.zeros(1), step, what)

    def writer_first(self, action: Callable[[], Result], what: str = "preparation") -> Result:
        """Run ``action`` on the writer, then on the other ranks (a cache the writer fills and the
        others read). An exception on the writer is raised on every rank (on the others as a
        ``ValueError`` with its message), so no rank waits for a peer that has given up."""
        if self.groups.data_group is None:
            return action()
        result: Any = None
        failure: BaseException | None = None
        if self.is_writer:
            try:
                result = action()
            except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
                failure = error
        message = [f"{type(failure).__name__}: {failure}" if failure is not None else ""]
        dist.broadcast_object_list(message, src=0, group=self.groups.data_group)
        if failure is not None:
            raise failure
        if message[0]:
            raise ValueError(f"{what} failed on rank 0: {message[0]}")
        return result if self.is_writer else action()

    def routing_metrics(
        self, model: nn.Module, step: int = 0, metrics: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """``metrics`` (default ``model.routing_metrics()``, ``{layer: metrics}``) merged over all ranks
        with :func:`~locmoe.parallel.rank_metrics.merge_rank_metrics` (one all-gather); unchanged in one
        process. Every rank must report the same layers, keys and shapes (they run the same code)."""
        metrics = model.routing_metrics() if metrics is None else metrics
        if self.groups.data_group is None:
            return metrics
        layout, pieces = [], []
        for layer, values in metrics.items():
            for key, value in values.items():
                tensor = torch.as_tensor(value, dtype=torch.float64)
                is_int = not torch.as_tensor(value).is_floating_point()
                layout.append((layer, key, tuple(tensor.shape), is_int))
                pieces.append(tensor.reshape(-1))
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
        gathered = [torch.empty_like(flat) for _ in range(self.groups.world_size)]
        run_collective(
            lambda: dist.all_gather(gathered, flat, group=self.groups.data_group, async_op=True),
            CollectiveLabel("training loop", step, "metric all-gather"),
            self.groups.timeout_s,
            self.groups.global_rank,
        )
        per_rank: list[dict[str, dict[str, Any]]] = []
        for row in gathered:
            unpacked: dict[str, dict[str, Any]] = {layer: {} for layer in metrics}
            offset = 0
            for layer, key, shape, is_int in layout:
                count = math.prod(shape)
                piece = row[offset : offset + count].reshape(shape)
                offset += count
                unpacked[layer][key] = piece.round().long().tolist() if is_int else piece.tolist()
            per_rank.append(unpacked)
        layers = dict(getattr(model, "moe_layers", {}))
        merged = {}
        for layer in metrics:
            module = layers.get(layer)
            global_scope = getattr(module, "routing_scope", "local") == "global"
            merged[layer] = merge_rank_metrics(
                [rank[layer] for rank in per_rank], self.groups.size if global_scope else 1
            )
        return merged

    def traffic(self, model: nn.Module, step: int = 0) -> dict[str, int]:
        """``{phase}_bytes_{kind}`` summed over the MoE layers and all ranks for the last step
        (forward and backward), plus ``inter_node_bytes`` / ``intra_node_bytes`` of dispatch and
        combine (forward and backward). One all-reduce."""
        counter = TrafficCounter()
        for layer in expert_parallel_layers(model).values():
            counter.merge(layer.dispatcher.traffic)
        phases = sorted(counter.bytes)
        names = [f"{phase}_bytes_{kind}" for phase in phases for kind in KINDS]
        values = torch.tensor([counter.bytes[phase][kind] for phase in phases for kind in KINDS], dtype=torch.float64)
        # Every rank runs the same layers, so the phase lists agree; the sum is then elementwise.
        summed = self.sum_over_ranks(values, step) if names else values
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

    def load_model_state(self, model: nn.Module, state: dict[str, Any], *, strict: bool = True) -> None:
        load_consolidated_state_dict(model, state, self.groups, strict=strict)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        load_consolidated_optimizer_state(model, optimizer, state)
