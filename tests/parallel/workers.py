"""Worker functions run in spawned processes by the tests in this folder (see ``ep_harness``)."""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from parallel.ep_harness import max_error, write_result

from locmoe.layer import MoELayer
from locmoe.parallel import (
    CollectiveContext,
    CollectiveTimeoutError,
    TrafficCounter,
    all_to_all,
    build_groups,
    clip_grad_norm,
    expert_parallel_layers,
    gather_counts,
    hierarchical_all_to_all,
    shard_layer,
    synchronize_gradients,
)

D_MODEL, D_FF, NUM_EXPERTS = 16, 24, 8
TOKENS_PER_RANK = (12, 16, 5, 9)  # uneven on purpose


# --------------------------------------------------------------------------------------------------
# Equivalence with one process
# --------------------------------------------------------------------------------------------------


def _starve_last_rank(layer: MoELayer, x: torch.Tensor) -> None:
    """Make the last two experts (the last rank's) lose every token: a constant feature that
    their gate rows weigh very negatively."""
    x[:, 0] = 3.0
    with torch.no_grad():
        layer.router.gate.weight[-2:, 0] = -20.0


def _equivalence_case(rank: int, world_size: int, groups, case: dict[str, Any]) -> dict[str, Any]:
    sizes = case.get("tokens", TOKENS_PER_RANK)
    torch.manual_seed(7)
    reference = MoELayer(
        D_MODEL, D_FF, NUM_EXPERTS, router=case["router"], dispatch=case.get("dispatch", "pad"),
        activation=case.get("activation", "gelu"), **case.get("options", {}),
    )
    reference.set_expert_nodes(groups.topology.expert_nodes(NUM_EXPERTS))
    generator = torch.Generator().manual_seed(11)
    total = sum(sizes)
    x_global = torch.randn(total, D_MODEL, generator=generator)
    token_ids = torch.randint(0, 50, (total,), generator=generator)
    weights = torch.randn(total, D_MODEL, generator=generator)
    if case.get("starve_last_rank"):
        _starve_last_rank(reference, x_global)
    token_nodes = torch.repeat_interleave(torch.tensor(groups.topology.rank_nodes), torch.tensor(sizes))
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])

    # Expert parallel: this rank's tokens only.
    layer = shard_layer(
        copy.deepcopy(reference), groups, hierarchical=case.get("hierarchical", False),
        routing_scope=case.get("routing_scope", "local"),
    )
    x = x_global[start:stop].clone().requires_grad_()
    out = layer(x, token_ids=token_ids[start:stop])
    loss = (out * weights[start:stop]).sum() + layer.aux_loss
    loss.backward()
    synchronize_gradients(layer, groups, reduction="sum")

    # One process, the same routing groups: each rank's tokens (local scope, a fresh copy of the
    # initial layer per group so stateful routers start alike) or all tokens (global scope).
    x_reference = x_global.clone().requires_grad_()
    if case.get("routing_scope", "local") == "local":
        copies = [copy.deepcopy(reference) for _ in sizes]
        outputs, objective = [], x_reference.new_zeros(())
        for group, replica in enumerate(copies):
            a, b = sum(sizes[:group]), sum(sizes[: group + 1])
            output = replica(x_reference[a:b], token_ids=token_ids[a:b], token_nodes=token_nodes[a:b])
            outputs.append(output)
            objective = objective + (output * weights[a:b]).sum() + replica.aux_loss
        reference_out = torch.cat(outputs)
        reference_aux = copies[rank].aux_loss
    else:
        copies = [reference]
        reference_out = reference(x_reference, token_ids=token_ids, token_nodes=token_nodes)
        objective = (reference_out * weights).sum() + world_size * reference.aux_loss
        reference_aux = reference.aux_loss
    objective.backward()

    def summed_grad(name: str) -> torch.Tensor:
        grads = [dict(c.named_parameters())[name].grad for c in copies]
        return sum(g for g in grads if g is not None)

    block = slice(rank * NUM_EXPERTS // world_size, (rank + 1) * NUM_EXPERTS // world_size)
    errors = {
        "output": max_error(out, reference_out[start:stop]),
        "input_grad": max_error(x.grad, x_reference.grad[start:stop]),
        "aux_loss": max_error(layer.aux_loss, reference_aux),
    }
    for name, parameter in layer.router.named_parameters():
        errors[f"router.{name}.grad"] = max_error(parameter.grad, summed_grad(f"router.{name}"))
    for name, parameter in layer.experts.named_parameters():
        errors[f"experts.{name}.grad"] = max_error(parameter.grad, summed_grad(f"experts.{name}")[block])
    reference_norm = sum(summed_grad(name).double().pow(2).sum() for name, _ in copies[0].named_parameters()) ** 0.5
    errors["grad_norm"] = max_error(clip_grad_norm(layer, groups), reference_norm)
    scale = float(reference_out.detach().abs().max()) + float(x_reference.grad.abs().max()) + float(reference_norm)
    metrics = layer.last_metrics
    return {
        "errors": errors,
        "scale": scale,
        "received_tokens": metrics["received_tokens"],
        "processed_slots": metrics["processed_slots"],
        "reference_slots": sum(c.last_metrics["processed_slots"] for c in copies),
        "tokens_per_expert": metrics["tokens_per_expert"],
        "expert_ids": layer.expert_ids.tolist(),
    }


def equivalence_worker(rank: int, world_size: int, out_dir: str, cases: list[dict[str, Any]]) -> None:
    groups = build_groups(ranks_per_node=2)
    write_result(out_dir, rank, {case["name"]: _equivalence_case(rank, world_size, groups, case) for case in cases})


# --------------------------------------------------------------------------------------------------
# All-to-all: flat vs hierarchical, byte counters vs what the collectives are given
# --------------------------------------------------------------------------------------------------


class RecordingCollectives:
    """Wraps ``dist.all_to_all_single`` / ``dist.all_gather`` and adds up, per kind of link, the bytes
    each call is handed for other ranks, from the call's own tensors and split sizes."""

    def __init__(self, node_of) -> None:  # noqa: ANN001
        self.node_of = node_of
        self.bytes = {"self": 0, "intra_node": 0, "inter_node": 0}
        self.original_all_to_all = dist.all_to_all_single
        self.original_all_gather = dist.all_gather

    def _add(self, group, sizes: list[int]) -> None:  # noqa: ANN001
        me = dist.get_rank()
        for group_rank, size in enumerate(sizes):
            peer = dist.get_global_rank(group, group_rank) if group is not None else group_rank
            kind = "self" if peer == me else "intra_node" if self.node_of(peer) == self.node_of(me) else "inter_node"
            self.bytes[kind] += size

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,  # noqa: A002, ANN001, ANN201
                          async_op=False):
        row = math.prod(input.shape[1:]) * input.element_size()
        self._add(group or dist.group.WORLD, [s * row for s in input_split_sizes])
        return self.original_all_to_all(output, input, output_split_sizes, input_split_sizes, group=group,
                                        async_op=async_op)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):  # noqa: ANN001, ANN201
        size = tensor.numel() * tensor.element_size()
        self._add(group or dist.group.WORLD, [size] * len(tensor_list))
        return self.original_all_gather(tensor_list, tensor, group=group, async_op=async_op)

    def __enter__(self) -> RecordingCollectives:
        dist.all_to_all_single = self.all_to_all_single
        dist.all_gather = self.all_gather
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_to_all_single = self.original_all_to_all
        dist.all_gather = self.original_all_gather


def all_to_all_worker(rank: int, world_size: int, out_dir: str, ranks_per_node: int) -> None:
    """Random uneven split matrices (with empty blocks and a rank that receives nothing) through the
    flat and hierarchical exchanges, forward and backward; traffic counters vs recorded calls."""
    groups = build_groups(ranks_per_node=ranks_per_node)
    generator = torch.Generator().manual_seed(5)
    results = []
    for trial in range(4):
        matrix = torch.randint(0, 5, (world_size, world_size), generator=generator)
        matrix[:, trial % world_size] = 0  # this rank receives nothing in this trial
        if trial == 1:
            matrix[rank, (rank + 1) % world_size] = 0  # a rank-local change: the rows must be agreed
        matrix = gather_counts(matrix[rank].clone(), CollectiveContext(groups))
        send = matrix[rank].tolist()
        recv = matrix[:, rank].tolist()
        payload = torch.randn(sum(send), 3, generator=torch.Generator().manual_seed(100 * trial + rank))
        # Mark every row with its source and destination so misplacement cannot go unnoticed.
        destinations = torch.repeat_interleave(torch.arange(world_size), torch.tensor(send))
        payload[:, 0] = rank
        payload[:, 1] = destinations.double()
        upstream = torch.randn(sum(recv), 3, generator=torch.Generator().manual_seed(7 + trial))
        outcome: dict[str, Any] = {}
        outputs, grads = {}, {}
        for mode in ("flat", "hierarchical"):
            traffic = TrafficCounter()
            context = CollectiveContext(groups, "test", trial, traffic)
            x = payload.clone().requires_grad_()
            with RecordingCollectives(groups.topology.node_of) as recorder:
                if mode == "flat":
                    y = all_to_all(x, send, recv, context, "dispatch")
                else:
                    y = hierarchical_all_to_all(x, matrix.tolist(), context, "dispatch")
                (y * upstream).sum().backward()
            outputs[mode], grads[mode] = y.detach(), x.grad
            counted = {kind: traffic.total(kind) for kind in ("self", "intra_node", "inter_node")}
            outcome[mode] = {
                "counted": counted,
                "recorded": recorder.bytes,
                "phases": sorted(traffic.bytes),
                "forward_inter_node": traffic.bytes["dispatch"]["inter_node"],
                "inter_node_messages": traffic.messages["dispatch"]["inter_node"],
            }
            expected_sources = torch.repeat_interleave(torch.arange(world_size), torch.tensor(recv)).double()
            outcome[mode]["sources_ok"] = bool(torch.equal(y[:, 0].detach(), expected_sources))
            outcome[mode]["destinations_ok"] = bool((y[:, 1] == rank).all())
            outcome[mode]["rows"] = int(y.shape[0])
        outcome["flat_equals_hierarchical"] = bool(torch.equal(outputs["flat"], outputs["hierarchical"]))
        outcome["grads_equal"] = bool(torch.equal(grads["flat"], grads["hierarchical"]))
        outcome["expected_rows"] = sum(recv)
        outcome["expected_inter_node_bytes"] = sum(
            send[d] * 3 * 4 for d in range(world_size) if groups.topology.node_of(d) != groups.node
        )
        results.append(outcome)
    write_result(out_dir, rank, results)


def layer_traffic_worker(rank: int, world_size: int, out_dir: str) -> None:
    """The layer's byte counters vs the collectives' recorded bytes and vs bytes derived from the
    routing plan, for the flat and the hierarchical exchange."""
    groups = build_groups(ranks_per_node=2)
    results = {}
    for hierarchical in (False, True):
        torch.manual_seed(3)
        layer = shard_layer(MoELayer(D_MODEL, D_FF, NUM_EXPERTS, "topk"), groups, hierarchical=hierarchical)
        x = torch.randn(20 + 3 * rank, D_MODEL, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        with RecordingCollectives(groups.topology.node_of) as recorder:
            out = layer(x)
            forward_recorded = dict(recorder.bytes)
            out.square().sum().backward()
        metrics = layer.last_metrics
        plan = layer.last_plan
        destination = plan.expert_ids[plan.kept] // (NUM_EXPERTS // world_size)
        rows_to = [int((destination == d).sum()) for d in range(world_size)]
        row_bytes = D_MODEL * 4
        node_of = groups.topology.node_of
        forward_phases = ("dispatch", "combine", "split_agreement", "global_gather")
        results["hierarchical" if hierarchical else "flat"] = {
            "forward_recorded": forward_recorded,
            "all_recorded": recorder.bytes,
            "counted_forward": {
                kind: sum(metrics.get(f"{phase}_bytes_{kind}", 0) for phase in forward_phases)
                for kind in ("self", "intra_node", "inter_node")
            },
            "counted_all": {
                kind: layer.dispatcher.traffic.total(kind) for kind in ("self", "intra_node", "inter_node")
            },
            "phases": sorted(layer.dispatcher.traffic.bytes),
            "dispatch_bytes_inter_node": metrics["dispatch_bytes_inter_node"],
            "dispatch_bytes_intra_node": metrics["dispatch_bytes_intra_node"],
            "combine_bytes_inter_node": metrics["combine_bytes_inter_node"],
            "plan_inter_node_bytes": sum(
                rows_to[d] * row_bytes for d in range(world_size) if node_of(d) != groups.node
            ),
            "plan_intra_node_bytes": sum(
                rows_to[d] * row_bytes for d in range(world_size) if d != rank and node_of(d) == groups.node
            ),
            "inter_node_share": metrics["inter_node_share"],
        }
    write_result(out_dir, rank, results)


# --------------------------------------------------------------------------------------------------
# Timeouts
# --------------------------------------------------------------------------------------------------


def stall_worker(rank: int, world_size: int, out_dir: str, stall_rank: int, stall_s: float, timeout_s: float,
                 where: str) -> None:
    """Train a layer for 3 steps; at step 2 rank ``stall_rank`` stalls for ``stall_s`` seconds
    (``where`` = ``"before_forward"`` or ``"in_experts"``, between dispatch and combine)."""
    groups = build_groups(ranks_per_node=2, timeout_s=timeout_s)
    torch.manual_seed(0)
    layer = shard_layer(MoELayer(D_MODEL, D_FF, NUM_EXPERTS, "switch"), groups, name="blocks.1.ffn")
    if where == "in_experts" and rank == stall_rank:
        original = layer.experts.forward_grouped

        def slow_experts(*args: Any) -> torch.Tensor:
            if layer.dispatcher.step == 2:
                time.sleep(stall_s)
            return original(*args)

        layer.experts.forward_grouped = slow_experts
    started = time.monotonic()
    outcome: dict[str, Any] = {"error": None}
    try:
        for step in range(1, 4):
            if where == "before_forward" and rank == stall_rank and step == 2:
                time.sleep(stall_s)
            x = torch.randn(8, D_MODEL)
            layer(x).sum().backward()
        outcome["completed"] = True
    except CollectiveTimeoutError as error:
        outcome["error"] = str(error)
        outcome["type"] = type(error).__name__
    outcome["seconds"] = time.monotonic() - started
    write_result(out_dir, rank, outcome)
    if outcome["error"] is not None:
        # The process group is unusable after a failed collective: leave without tearing it down.
        os._exit(0)


def killed_rank_worker(rank: int, world_size: int, out_dir: str, dead_rank: int, timeout_s: float) -> None:
    """Train a layer for 3 steps; at step 2 rank ``dead_rank`` dies (``os._exit``, no goodbye). The
    others must fail with an error (the peer's closed connection, or the collective timeout), not hang."""
    groups = build_groups(ranks_per_node=2, timeout_s=timeout_s)
    torch.manual_seed(0)
    layer = shard_layer(MoELayer(D_MODEL, D_FF, NUM_EXPERTS, "switch"), groups, name="blocks.1.ffn")
    started = time.monotonic()
    outcome: dict[str, Any] = {"error": None}
    try:
        for step in range(1, 4):
            if rank == dead_rank and step == 2:
                os._exit(0)  # exit code 0: the launcher leaves the other ranks running
            layer(torch.randn(8, D_MODEL)).sum().backward()
        outcome["completed"] = True
    except Exception as error:  # noqa: BLE001 - whatever the survivors see, they must see something
        outcome["error"] = str(error)[:500]
        outcome["type"] = type(error).__name__
    outcome["seconds"] = time.monotonic() - started
    write_result(out_dir, rank, outcome)
    os._exit(0)  # the process group is unusable after a failed collective: leave without tearing it down


# --------------------------------------------------------------------------------------------------
# Small helpers used by several tests
# --------------------------------------------------------------------------------------------------


def result_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.json"


# --------------------------------------------------------------------------------------------------
# Checkpoints: save on 4 ranks, resume on 2 or 1
# --------------------------------------------------------------------------------------------------

VOCAB, GLOBAL_BATCH, SEQUENCE = 32, 8, 6


class TinyLM(torch.nn.Module):
    """Embedding -> residual MoE layer -> linear head: just enough model around one MoE layer."""

    def __init__(self, router: str = "switch", vocab: int = VOCAB, **router_options: Any) -> None:
        super().__init__()
        self.vocab = vocab
        self.embedding = torch.nn.Embedding(vocab, D_MODEL)
        self.moe = MoELayer(D_MODEL, D_FF, NUM_EXPERTS, router=router, **router_options)
        self.head = torch.nn.Linear(D_MODEL, vocab)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(ids)
        hidden = hidden + self.moe(hidden, token_ids=ids)
        logits = self.head(hidden)
        lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))
        return lm_loss + self.moe.aux_loss


def build_tiny_lm(groups, routing_scope: str = "global"):  # noqa: ANN001, ANN201
    from locmoe.parallel import shard_experts

    torch.manual_seed(21)
    model = TinyLM()
    shard_experts(model, groups, routing_scope=routing_scope)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer


def train_tiny_lm(model, optimizer, groups, steps: range) -> list[float]:  # noqa: ANN001
    """Steps of the same global batch sequence on any number of ranks; returns the global mean loss."""
    from locmoe.parallel import clip_grad_norm

    losses = []
    for step in steps:
        generator = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQUENCE), generator=generator)
        targets = (ids * 7 + 3) % VOCAB
        rows = GLOBAL_BATCH // groups.size
        local = slice(groups.rank * rows, (groups.rank + 1) * rows)
        loss = model(ids[local], targets[local])
        optimizer.zero_grad()
        loss.backward()
        synchronize_gradients(model, groups)
        clip_grad_norm(model, groups, 1.0)
        optimizer.step()
        value = loss.detach().reshape(1).clone()
        if groups.data_group is not None:
            dist.all_reduce(value, group=groups.data_group)
        losses.append(float(value) / groups.world_size)
    return losses


def checkpoint_worker(rank: int, world_size: int, out_dir: str, mode: str) -> None:
    """``mode="save"``: 3 steps, consolidated checkpoint (and per-rank shards), 3 more steps.
    ``mode="resume"``: load the checkpoint, run steps 4–6."""
    from locmoe.parallel.checkpoint import (
        consolidated_optimizer_state,
        consolidated_state_dict,
        load_consolidated_optimizer_state,
        load_consolidated_state_dict,
    )

    groups = build_groups()
    model, optimizer = build_tiny_lm(groups)
    checkpoint = Path(out_dir) / "checkpoint.pt"
    if mode == "save":
        before = train_tiny_lm(model, optimizer, groups, range(1, 4))
        state = {"model": consolidated_state_dict(model, groups), "optimizer": consolidated_optimizer_state(
            model, optimizer, groups)}
        torch.save(model.state_dict(), Path(out_dir) / f"shard{rank}.pt")
        if rank == 0:
            torch.save(state, checkpoint)
        dist.barrier()
        after = train_tiny_lm(model, optimizer, groups, range(4, 7))
        write_result(out_dir, rank, {"before": before, "after": after})
    else:
        state = torch.load(checkpoint, weights_only=True)
        load_consolidated_state_dict(model, state["model"], groups)
        load_consolidated_optimizer_state(model, optimizer, state["optimizer"])
        after = train_tiny_lm(model, optimizer, groups, range(4, 7))
        write_result(Path(out_dir) / f"resume{world_size}", rank, {"after": after})


# --------------------------------------------------------------------------------------------------
# Locality loss: inter-node traffic with and without it
# --------------------------------------------------------------------------------------------------


def locality_worker(rank: int, world_size: int, out_dir: str, router: str, locality_coef: float, steps: int,
                    node_vocabulary: bool) -> None:
    """Train ``TinyLM`` on 2 simulated nodes × 2 ranks and record the dispatch bytes per step.

    ``node_vocabulary``: each node draws its tokens from its own half of the vocabulary (documents
    sharded by topic), so token features can learn which node they come from; otherwise every rank
    draws from the whole vocabulary (i.i.d. shards)."""
    from locmoe.parallel import shard_experts

    groups = build_groups(ranks_per_node=2)
    vocab = 64
    torch.manual_seed(5)
    model = TinyLM(router, vocab=vocab, locality_coef=locality_coef)
    shard_experts(model, groups)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    layer = model.moe
    history = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        if node_vocabulary:
            half = vocab // 2
            ids = torch.randint(0, half, (4, 8), generator=generator) + half * groups.node
        else:
            ids = torch.randint(0, vocab, (4, 8), generator=generator)
        targets = (ids * 5 + 1) % vocab
        loss = model(ids, targets)
        optimizer.zero_grad()
        loss.backward()
        synchronize_gradients(model, groups)
        optimizer.step()
        sent = dict(layer.dispatcher.traffic.bytes["dispatch"])
        history.append({
            "loss": float(loss.detach()),
            "aux_loss": float(layer.aux_loss.detach()),
            "dispatch": sent,
            "remote_share": layer.last_metrics["remote_share"],
        })
    write_result(out_dir, rank, history)


# --------------------------------------------------------------------------------------------------
# The trainer-facing runtime on the project's GPT
# --------------------------------------------------------------------------------------------------


def train_gpt_with_runtime(runtime, steps: int = 3) -> dict[str, Any]:  # noqa: ANN001
    """A few AdamW steps of a tiny GPT (2 MoE blocks, ``locmoe_plus`` with ``routing_scope="global"``) on a
    fixed sequence of global batches, through :class:`ExpertParallelRuntime` only."""
    from locmoe.config import ModelConfig
    from locmoe.model import build_model

    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, d_ff=48, seq_len=12, num_experts=4, moe_every=1,
        # No locality loss: it depends on the topology (two nodes here, one in the single process).
        router="locmoe_plus", routing_scope="global", router_options={"locality_coef": 0.0},
    )
    torch.manual_seed(0)
    model = runtime.build_model(build_model, config, 50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms, traffic = [], [], []
    for step in range(1, steps + 1):
        tokens = torch.randint(0, 50, (4, 13), generator=torch.Generator().manual_seed(step))
        inputs, targets = runtime.local_rows(tokens[:, :-1], tokens[:, 1:])
        runtime.set_step(model, step)
        lm_loss, aux_loss = model.loss(inputs, targets)
        optimizer.zero_grad()
        (lm_loss + aux_loss).backward()
        norm = runtime.finish_backward(model, 0.5, step)
        optimizer.step()
        logged = runtime.mean_over_ranks(torch.stack([lm_loss.detach(), aux_loss.detach()]), step)
        losses.append(logged.tolist())
        norms.append(float(norm))
        traffic.append(runtime.traffic(model, step))
    steps_seen = [layer.dispatcher.step for layer in expert_parallel_layers(model).values()]
    return {"losses": losses, "norms": norms, "traffic": traffic, "layer_steps": steps_seen}


def runtime_worker(rank: int, world_size: int, out_dir: str) -> None:
    from locmoe.parallel.runtime import ExpertParallelRuntime

    runtime = ExpertParallelRuntime(build_groups(ranks_per_node=1), hierarchical=True)
    write_result(out_dir, rank, train_gpt_with_runtime(runtime))
