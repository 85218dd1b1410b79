"""First-order step-time model of MoE training on a cluster (design §10.3): pure functions.

Per MoE layer and micro-batch, on the critical (most loaded) rank: roofline times for the expert
GEMMs, the dense GEMMs and the attention core, memory-bound routing and permutation, and an
alpha-beta time for the four all-to-all exchanges (dispatch, combine and their backward twins)
split into intra- and inter-node parts; then overlap, the interleaved-1F1B pipeline bubble and the
data-parallel gradient reduction. Routing enters only through the dimensionless statistics of
:class:`~locmoe.projection.specs.RoutingStats`.

Symbols: ``T = mbs·s/TP`` tokens per device per micro-batch (sequence parallelism); σ expert slots
per token (pad: ``n·C/S``; pack: kept assignments); μ rank imbalance (max/mean); ``P`` peak FLOP/s;
``B`` link bandwidth per device per direction; α latency per exchange; ω overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from locmoe.projection.specs import ClusterSpec, ModelSpec, ParallelSpec, RoutingStats

EXCHANGES = 4  # dispatch, combine, and their backward twins (same bytes each)
COMPONENTS = ("expert_gemm", "dense_gemm", "attention", "routing", "permutation", "all_to_all_intra",
              "all_to_all_inter", "pipeline_bubble", "dp_reduce")
# Extra passes over the layer input of each router's selection, beyond reading it once for the gate
# (ours, assumed: LocMoE+ sorts affinities for its score-sum threshold; not measured on a GPU).
ROUTING_PASSES = {"locmoe_plus": 2.0, "ecr": 2.0, "expert_choice": 2.0}


def alpha_beta_time(latency_s: float, nbytes: float, bandwidth_bytes_s: float) -> float:
    """``t = α + bytes / B``: the latency-bandwidth cost of one transfer (nccl-tests' "overhead +
    size / bw", https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md); 0 for no bytes."""
    if nbytes <= 0:
        return 0.0
    return latency_s + nbytes / bandwidth_bytes_s


@dataclass(frozen=True)
class Placement:
    """Where one EP group sits: ``nodes`` G_ep nodes, ``ranks_per_node`` L_ep of its ranks on each."""

    nodes: int
    ranks_per_node: int


def ep_placement(parallel: ParallelSpec, devices_per_node: int, total_nodes: int) -> Placement:
    """The nodes an EP group spans (ours). ``packed``: EP ranks sit TP apart (Megatron's order), so
    ``L_ep = clamp(L/TP, 1, EP)`` share a node; ``spread``: one EP group over ``min(EP, nodes)``
    nodes. ``EP`` must divide evenly over the nodes it spans."""
    ep = parallel.ep
    if parallel.placement == "spread":
        nodes = min(ep, total_nodes)
    else:
        per_node = max(1, min(ep, devices_per_node // parallel.tp))
        nodes = -(-ep // per_node)
    if ep % nodes:
        raise ValueError(f"ep = {ep} does not spread evenly over {nodes} nodes")
    if nodes > total_nodes:
        raise ValueError(
            f"an EP group of {ep} ranks TP = {parallel.tp} apart needs {nodes} "
            f"nodes, the mapping has {total_nodes}"
        )
    return Placement(nodes=nodes, ranks_per_node=ep // nodes)


def target_remote_share(lift: float, placement: Placement) -> float:
    """ρ_tgt = (1 − λ)·(1 − 1/G_ep): the share of routed rows bound for another node when the
    run's locality lift λ carries over to G_ep nodes each holding ``n/G_ep ≥ 1`` experts (design
    §10.2, ours)."""
    if placement.nodes <= 1:
        return 0.0
    return min(1.0, max(0.0, (1.0 - lift) * (1.0 - 1.0 / placement.nodes)))


@dataclass(frozen=True)
class LayerCost:
    """Times (s) of one MoE layer on the critical rank for one micro-batch."""

    expert_gemm: float
    dense_gemm: float
    attention: float
    routing: float
    permutation: float
    a2a_intra_raw: float  # 4 exchanges, intra-node part alone
    a2a_inter_raw: float  # 4 exchanges, inter-node part alone
    a2a_critical: float  # 4 exchanges as they run (flat: max of the two; hierarchical: sum of hops)
    overlap_credit: float
    rows_per_expert: float
    remote_share: float
    gemm_efficiency: float


def moe_layer_cost(model: ModelSpec, parallel: ParallelSpec, cluster: ClusterSpec, stats: RoutingStats,
                   total_nodes: int, which: str = "value") -> LayerCost:
    """One MoE layer (design §10.3, formulas 1-5), forward + backward, critical rank.

    * Expert GEMMs: ``F = 6·n_mat·d·f_e·σ·T·μ`` at ``η_gemm(m_e)``, ``m_e = σ·mbs·s·EP/n`` rows per
      expert (ETP = TP shards each expert's width, not its rows).
    * Dense: ``6·(d(2d + 2d_kv) + d·n)·T`` at ``η_gemm(mbs·s)``; attention core ``6·s·d·T`` (causal;
      ``12·s·d·T`` full) at ``eff_attention``.
    * Routing ``2·c_r·T·d·β / (HBM·η_hbm)`` (forward and backward read the input ``c_r`` times);
      permutation ``8·σ·T·d·β / (HBM·η_hbm)`` (gather + scatter, dispatch + combine, ×2 backward).
    * All-to-all bytes per exchange ``V = σ·T·d·β``; inter ``V_out = μ·ρ·V``, intra
      ``V_in = μ·(1−ρ)·(L_ep−1)/L_ep·V``; with TP > 1 the received rows are all-gathered inside TP:
      ``(TP−1)·σ·T·d·β`` more intra bytes (ETP = TP, ours). Flat: ``max(α_in + V_in/(B_in η_in),
      α_out + α_peer·(EP−L_ep) + V_out·φ/(B_out η_out))`` (concurrent links); hierarchical
      (DeepSpeed-MoE / Tutel): intra gather ``V_in + V_out``, inter ``V_out``, intra scatter
      ``V_out``, summed.
    * Overlap: ``ω·min(t_exp + t_dense, t_comm)`` of the communication hides under compute.
    """
    d, s, beta = model.d_model, model.seq_len, model.dtype_bytes
    tokens = parallel.mbs * s / parallel.tp
    peak = cluster.value("peak_tflops") * 1e12
    hbm = cluster.value("hbm_gbps") * 1e9 * cluster.value("eff_hbm")
    sigma = stats.slots(parallel.dispatch, which)
    mu = stats.imbalance_for(parallel.ep, which)
    if model.num_experts % parallel.ep:
        raise ValueError(f"ep = {parallel.ep} must divide the model's {model.num_experts} experts")

    rows_per_expert = sigma * parallel.mbs * s * parallel.ep / model.num_experts
    eta = cluster.gemm_curve.efficiency(rows_per_expert)
    expert = 6.0 * model.matrices * d * model.d_expert * sigma * tokens * mu / (peak * eta)
    dense_flops = 6.0 * (model.attention_params() + d * model.num_experts) * tokens
    dense = dense_flops / (peak * cluster.gemm_curve.efficiency(parallel.mbs * s))
    attention = 6.0 * s * d * tokens * (1 if model.causal else 2) / (peak * cluster.value("eff_attention"))
    routing = 2.0 * ROUTING_PASSES.get(stats.router, 1.0) * tokens * d * beta / hbm
    permutation = 8.0 * sigma * tokens * d * beta / hbm

    placement = ep_placement(parallel, cluster.devices_per_node, total_nodes)
    rho = target_remote_share(stats.locality_lift(which), placement) if parallel.ep > 1 else 0.0
    volume = sigma * tokens * d * beta
    local_ranks = placement.ranks_per_node
    v_out = mu * rho * volume
    v_in = mu * (1.0 - rho) * (local_ranks - 1) / local_ranks * volume if parallel.ep > 1 else 0.0
    b_in = cluster.value("intra_gbps") * 1e9 * cluster.value("eff_intra")
    b_out = cluster.value("inter_gbps") * 1e9 * cluster.value("eff_inter") / cluster.value("oversubscription")
    a_in = cluster.value("alpha_intra_us") * 1e-6
    remote_peers = parallel.ep - local_ranks
    a_out = (cluster.value("alpha_inter_us") + cluster.value("alpha_inter_peer_us") * remote_peers) * 1e-6
    tp_gather = alpha_beta_time(a_in, (parallel.tp - 1) * volume * mu, b_in) if parallel.tp > 1 else 0.0
    inter = alpha_beta_time(a_out, v_out, b_out)
    if parallel.dispatcher == "flat" or placement.nodes == 1:
        intra = alpha_beta_time(a_in, v_in, b_in)
        one_exchange = max(intra, inter) + tp_gather
    else:
        intra = alpha_beta_time(a_in, v_in + v_out, b_in) + alpha_beta_time(a_in, v_out, b_in)
        one_exchange = intra + inter + tp_gather
    comm = EXCHANGES * one_exchange
    credit = parallel.overlap * min(expert + dense + attention, comm)
    return LayerCost(
        expert_gemm=expert, dense_gemm=dense, attention=attention, routing=routing, permutation=permutation,
        a2a_intra_raw=EXCHANGES * (intra + tp_gather), a2a_inter_raw=EXCHANGES * inter, a2a_critical=comm,
        overlap_credit=credit, rows_per_expert=rows_per_expert, remote_share=rho, gemm_efficiency=eta,
    )


def dense_layer_time(model: ModelSpec, parallel: ParallelSpec, cluster: ClusterSpec) -> tuple[float, float]:
    """(GEMM, attention core) time of a dense (non-MoE) layer per micro-batch per device."""
    d, s = model.d_model, model.seq_len
    tokens = parallel.mbs * s / parallel.tp
    peak = cluster.value("peak_tflops") * 1e12
    params = model.attention_params() + model.matrices * d * model.d_ff_dense
    gemm = 6.0 * params * tokens / (peak * cluster.gemm_curve.efficiency(parallel.mbs * s))
    attention = 6.0 * s * d * tokens * (1 if model.causal else 2) / (peak * cluster.value("eff_attention"))
    return gemm, attention


@dataclass(frozen=True)
class StepCost:
    """One training step: the components (s) summing to ``step_time_s``, and derived figures."""

    step_time_s: float
    components: dict[str, float]
    a2a_intra_raw_s: float
    a2a_inter_raw_s: float
    a2a_raw_s: float
    a2a_exposed_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: float
    devices: int
    nodes: int
    micro_batches: int
    remote_share: float
    rows_per_expert: float
    gemm_efficiency: float
    parallel: ParallelSpec = field(repr=False)

    @property
    def a2a_share_raw(self) -> float:
        return self.a2a_raw_s / self.step_time_s

    @property
    def a2a_share_exposed(self) -> float:
        return self.a2a_exposed_s / self.step_time_s


def step_cost(model: ModelSpec, parallel: ParallelSpec, cluster: ClusterSpec, stats: RoutingStats,
              nodes: int | None = None, which: str = "value") -> StepCost:
    """The step time of ``model`` on ``cluster`` under ``parallel`` with the routing ``stats``
    (design §10.3, formula 6):

        t_step = m · t_stage + t_stage·(PP − 1)/VP + (1 − ω_dp)·t_dp
        t_stage = (L_moe·t_moe + (L − L_moe)·t_dense + t_head) / PP

    with ``m = GBS/(DP·mbs)`` micro-batches and ``t_moe = t_dense,ℓ + t_route + t_perm + t_exp +
    t_comm − ω·min(t_exp + t_dense,ℓ, t_comm)``. The bubble is interleaved 1F1B's
    ``(PP − 1)/(VP·m)`` of the pipeline's busy time. The DP reduce is a ring reduce-scatter +
    all-gather, ``2(p−1)/p·bytes/B``, of each rank's gradients (``grad_bytes`` per parameter): the
    dense ones over DP, the expert ones over ``DP·TP/EP`` expert-data ranks, on the inter-node link
    when the group spans nodes. Layers split evenly over stages, LM head included (ours). Optimiser
    and memory are not modelled.
    """
    devices_per_node = cluster.devices_per_node
    parallel = parallel.resolved(nodes, devices_per_node)
    total_nodes = max(1, -(-parallel.devices // devices_per_node))
    if parallel.dp % parallel.ep:
        raise ValueError(f"ep = {parallel.ep} must divide dp = {parallel.dp} (experts are sharded over TP, ours)")
    if model.num_experts % parallel.ep:
        raise ValueError(f"ep = {parallel.ep} must divide the model's {model.num_experts} experts")
    if model.n_layers % parallel.pp:
        raise ValueError(f"pp = {parallel.pp} must divide the model's {model.n_layers} layers")
    sequences_per_step = parallel.dp * parallel.mbs
    if model.global_batch % sequences_per_step:
        raise ValueError(f"global batch {model.global_batch} is not a multiple of dp·mbs = {sequences_per_step}")
    micro = model.global_batch // sequences_per_step
    peak = cluster.value("peak_tflops") * 1e12

    layer = moe_layer_cost(model, parallel, cluster, stats, total_nodes, which)
    dense_gemm, dense_attention = dense_layer_time(model, parallel, cluster)
    tokens = parallel.mbs * model.seq_len / parallel.tp
    head = 6.0 * model.vocab_size * model.d_model * tokens / (peak * cluster.gemm_curve.efficiency(tokens))
    dense_layers = model.n_layers - model.moe_layers
    exposed_comm = layer.a2a_critical - layer.overlap_credit
    per_stage = {
        "expert_gemm": model.moe_layers * layer.expert_gemm,
        "dense_gemm": model.moe_layers * layer.dense_gemm + dense_layers * dense_gemm + head,
        "attention": model.moe_layers * layer.attention + dense_layers * dense_attention,
        "routing": model.moe_layers * layer.routing,
        "permutation": model.moe_layers * layer.permutation,
    }
    # Exposed all-to-all split: the inter-node part first, the intra-node part what exceeds it (flat,
    # concurrent links) or all of it (hierarchical, sequential hops); then scaled by what overlap hides.
    if parallel.dispatcher == "flat":
        inter_part = min(layer.a2a_inter_raw, layer.a2a_critical)
    else:
        inter_part = layer.a2a_inter_raw
    intra_part = layer.a2a_critical - inter_part
    hidden = exposed_comm / layer.a2a_critical if layer.a2a_critical > 0 else 0.0
    per_stage["all_to_all_intra"] = model.moe_layers * intra_part * hidden
    per_stage["all_to_all_inter"] = model.moe_layers * inter_part * hidden
    stage_time = sum(per_stage.values()) / parallel.pp
    components = {name: micro * value / parallel.pp for name, value in per_stage.items()}
    components["pipeline_bubble"] = stage_time * (parallel.pp - 1) / parallel.vp if parallel.pp > 1 else 0.0
    components["dp_reduce"] = (1.0 - parallel.dp_overlap) * dp_reduce_time(model, parallel, cluster, total_nodes)
    components = {name: components[name] for name in COMPONENTS}
    step = sum(components.values())

    tokens_per_step = model.global_batch * model.seq_len
    flops = model.model_flops_per_token() * tokens_per_step
    raw = micro * model.moe_layers * layer.a2a_critical / parallel.pp
    return StepCost(
        step_time_s=step, components=components,
        a2a_intra_raw_s=micro * model.moe_layers * layer.a2a_intra_raw / parallel.pp,
        a2a_inter_raw_s=micro * model.moe_layers * layer.a2a_inter_raw / parallel.pp,
        a2a_raw_s=raw, a2a_exposed_s=components["all_to_all_intra"] + components["all_to_all_inter"],
        tokens_per_s_per_device=tokens_per_step / (step * parallel.devices),
        tflops_per_device=flops / (step * parallel.devices) / 1e12,
        mfu=flops / (step * parallel.devices * peak),
        devices=parallel.devices, nodes=total_nodes, micro_batches=micro, remote_share=layer.remote_share,
        rows_per_expert=layer.rows_per_expert, gemm_efficiency=layer.gemm_efficiency, parallel=parallel,
    )


def dp_reduce_time(model: ModelSpec, parallel: ParallelSpec, cluster: ClusterSpec, total_nodes: int) -> float:
    """Ring gradient reduction per step (see :func:`step_cost`); 0 when the groups have one rank."""
    L = cluster.devices_per_node
    dense_params = model.total_params() - model.moe_layers * model.num_experts * model.expert_params()
    expert_params = model.moe_layers * model.num_experts * model.expert_params()
    dense_bytes = dense_params / (parallel.tp * parallel.pp) * model.grad_bytes
    expert_bytes = expert_params / (parallel.ep * parallel.tp * parallel.pp) * model.grad_bytes
    expert_dp = parallel.dp // parallel.ep
    # Megatron's rank order (TP innermost, PP outermost): DP neighbours are TP apart, expert-DP
    # neighbours TP·EP apart; a group spans nodes when it has more ranks than fit in one (ours).
    groups = ((parallel.dp, dense_bytes, max(1, L // parallel.tp)),
              (expert_dp, expert_bytes, max(1, L // (parallel.tp * parallel.ep))))
    total = 0.0
    for ranks, nbytes, in_node in groups:
        if ranks <= 1:
            continue
        spans_nodes = ranks > in_node and total_nodes > 1
        if spans_nodes:
            bandwidth = (cluster.value("inter_gbps") * 1e9 * cluster.value("eff_inter")
                         / cluster.value("oversubscription"))
        else:
            bandwidth = cluster.value("intra_gbps") * 1e9 * cluster.value("eff_intra")
        total += 2.0 * (ranks - 1) / ranks * nbytes / bandwidth
    return total
