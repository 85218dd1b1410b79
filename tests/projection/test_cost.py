"""The cost model against hand-computed cases and invariants (design §10.3)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from locmoe.projection.cost import (
    COMPONENTS,
    EXCHANGES,
    Placement,
    alpha_beta_time,
    ep_placement,
    moe_layer_cost,
    step_cost,
    target_remote_share,
)
from locmoe.projection.specs import (
    ClusterSpec,
    Figure,
    GemmCurve,
    ModelSpec,
    ParallelSpec,
    Range,
    RoutingStats,
    available_presets,
    load_cluster,
    load_model,
)

FIGURES = {"peak_tflops": 1.0, "hbm_gbps": 100.0, "devices_per_node": 4, "intra_gbps": 10.0, "inter_gbps": 2.0,
           "alpha_intra_us": 3.0, "alpha_inter_us": 7.0, "alpha_inter_peer_us": 0.0, "oversubscription": 1.0,
           "eff_intra": 0.5, "eff_inter": 0.8, "eff_hbm": 0.5, "eff_attention": 0.25}


def toy_cluster(**overrides: float) -> ClusterSpec:
    figures = {name: Figure(overrides.get(name, value)) for name, value in FIGURES.items()}
    return ClusterSpec("toy", figures, GemmCurve(((1.0, 0.5),)))


def toy_model(**overrides) -> ModelSpec:
    base = dict(name="toy", d_model=8, d_expert=16, num_experts=4, top_k=1, n_layers=2, moe_layers=2, n_heads=2,
                n_kv_heads=1, vocab_size=32, seq_len=16, global_batch=8)
    return ModelSpec(**{**base, **overrides})


def toy_stats(slots: float = 1.25, mu: float = 1.2, rho: float | None = 0.25, router: str = "switch") -> RoutingStats:
    return RoutingStats("toy", router, Range.exact(slots), Range.exact(slots * 0.8), Range.exact(0.1),
                        Range.exact(mu), remote_share=None if rho is None else Range.exact(rho),
                        nodes=0 if rho is None else 2)


def test_alpha_beta_time_is_latency_plus_bytes_over_bandwidth():
    assert alpha_beta_time(2e-6, 1000.0, 1e9) == pytest.approx(2e-6 + 1e-6)
    assert alpha_beta_time(2e-6, 0.0, 1e9) == 0.0  # nothing sent, no latency paid


def test_gemm_curve_interpolates_linearly_in_log_rows():
    curve = GemmCurve(((100.0, 0.2), (10000.0, 0.6)))
    assert curve.efficiency(1000.0) == pytest.approx(0.4)
    assert curve.efficiency(10.0) == 0.2 and curve.efficiency(1e6) == 0.6
    assert curve.scaled(2.0).efficiency(10000.0) == 1.0  # capped


def test_expert_dense_attention_routing_times_match_hand_computation():
    model, cluster, stats = toy_model(), toy_cluster(), toy_stats()
    parallel = ParallelSpec(tp=1, pp=1, vp=1, dp=4, ep=2, mbs=2, dispatch="pad")
    layer = moe_layer_cost(model, parallel, cluster, stats, total_nodes=1)
    tokens = 2 * 16  # mbs · s / TP
    peak = 1e12
    assert layer.expert_gemm == pytest.approx(6 * 3 * 8 * 16 * 1.25 * tokens * 1.2 / (peak * 0.5))
    attention_params = 8 * (2 * 8 + 2 * 4)
    assert layer.dense_gemm == pytest.approx(6 * (attention_params + 8 * 4) * tokens / (peak * 0.5))
    assert layer.attention == pytest.approx(6 * 16 * 8 * tokens / (peak * 0.25))
    hbm = 100e9 * 0.5
    assert layer.routing == pytest.approx(2 * tokens * 8 * 2 / hbm)
    assert layer.permutation == pytest.approx(8 * 1.25 * tokens * 8 * 2 / hbm)
    assert layer.rows_per_expert == pytest.approx(1.25 * 2 * 16 * 2 / 4)


def test_flat_all_to_all_is_the_slower_link_and_hierarchical_the_sum_of_hops():
    model, stats = toy_model(), toy_stats(rho=0.25)  # λ = 1 − 0.25/0.5 = 0.5
    cluster = toy_cluster(devices_per_node=2)
    flat = ParallelSpec(tp=1, dp=4, ep=4, mbs=2, dispatch="pad", placement="packed")
    tokens, volume = 32, 1.25 * 32 * 8 * 2
    # EP 4 over 2-device nodes: 2 nodes, 2 ranks each; ρ_tgt = (1 − 0.5)(1 − 1/2) = 0.25.
    rho = 0.25
    v_out, v_in = 1.2 * rho * volume, 1.2 * (1 - rho) * 0.5 * volume
    intra = 3e-6 + v_in / (10e9 * 0.5)
    inter = 7e-6 + v_out / (2e9 * 0.8)
    layer = moe_layer_cost(model, flat, cluster, stats, total_nodes=2)
    assert tokens == 32 and layer.remote_share == pytest.approx(rho)
    assert layer.a2a_critical == pytest.approx(EXCHANGES * max(intra, inter))
    hier = moe_layer_cost(model, replace(flat, dispatcher="hierarchical"), cluster, stats, total_nodes=2)
    hops = (3e-6 + (v_in + v_out) / 5e9) + inter + (3e-6 + v_out / 5e9)
    assert hier.a2a_critical == pytest.approx(EXCHANGES * hops)


def test_random_placement_sends_one_minus_one_over_g_and_full_locality_nothing():
    for nodes in (2, 4, 8, 32):
        assert target_remote_share(0.0, Placement(nodes, 1)) == pytest.approx(1 - 1 / nodes)
        assert target_remote_share(1.0, Placement(nodes, 1)) == 0.0
    stats = toy_stats(rho=0.5)  # G₀ = 2, ρ = 1/2: random
    assert stats.locality_lift() == pytest.approx(0.0)
    assert toy_stats(rho=0.0).locality_lift() == pytest.approx(1.0)


def test_packed_and_spread_placements():
    assert ep_placement(ParallelSpec(tp=4, dp=2, ep=2), 8, 4) == Placement(1, 2)  # LocMoE+ 32 NPUs: one server
    assert ep_placement(ParallelSpec(tp=8, dp=2, ep=2), 8, 8) == Placement(2, 1)  # 64 NPUs: two servers
    assert ep_placement(ParallelSpec(tp=1, dp=32, ep=8, placement="spread"), 8, 4) == Placement(4, 2)
    assert ep_placement(ParallelSpec(tp=1, dp=8, ep=8, placement="spread"), 8, 1) == Placement(1, 8)


def test_components_sum_to_the_step_and_pipeline_formula_holds():
    model, cluster = toy_model(n_layers=4, moe_layers=4), toy_cluster()
    parallel = ParallelSpec(tp=1, pp=2, vp=1, dp=2, ep=2, mbs=1)
    cost = step_cost(model, parallel, cluster, toy_stats())
    assert set(cost.components) == set(COMPONENTS)
    assert sum(cost.components.values()) == pytest.approx(cost.step_time_s)
    micro = 8 // 2
    assert cost.micro_batches == micro
    busy = sum(v for k, v in cost.components.items() if k not in ("pipeline_bubble", "dp_reduce"))
    assert cost.components["pipeline_bubble"] == pytest.approx(busy / micro * (2 - 1) / 1)


@pytest.mark.parametrize("seed", range(5))
def test_more_bandwidth_or_efficiency_is_never_slower(seed):
    rng = np.random.default_rng(seed)
    model = toy_model(seq_len=int(rng.choice([16, 64])), global_batch=32)
    cluster = toy_cluster(inter_gbps=float(rng.uniform(0.5, 5)), intra_gbps=float(rng.uniform(5, 50)))
    parallel = ParallelSpec(tp=1, dp=0, ep=4, mbs=2, placement="spread", overlap=float(rng.uniform(0, 1)))
    stats = toy_stats(slots=float(rng.uniform(1, 2)), mu=float(rng.uniform(1, 1.5)), rho=float(rng.uniform(0, 0.5)))
    base = step_cost(model, parallel, cluster, stats, nodes=4).step_time_s
    for name in ("inter_gbps", "intra_gbps", "eff_inter", "hbm_gbps", "peak_tflops"):
        faster = cluster.with_value(name, cluster.value(name) * 1.2 if name != "eff_inter" else 1.0)
        assert step_cost(model, parallel, faster, stats, nodes=4).step_time_s <= base + 1e-15
    fewer_slots = replace(stats, padded_slots=Range.exact(stats.padded_slots.value * 0.8))
    assert step_cost(model, parallel, cluster, fewer_slots, nodes=4).step_time_s < base


def test_full_overlap_leaves_at_least_the_longer_of_compute_and_communication():
    model, cluster, stats = toy_model(), toy_cluster(inter_gbps=0.01), toy_stats()
    parallel = ParallelSpec(tp=1, dp=8, ep=4, mbs=2, placement="spread", overlap=1.0)
    layer = moe_layer_cost(model, parallel, cluster, stats, total_nodes=4)
    compute = layer.expert_gemm + layer.dense_gemm + layer.attention
    moe_time = compute + layer.routing + layer.permutation + layer.a2a_critical - layer.overlap_credit
    assert moe_time >= max(compute, layer.a2a_critical) - 1e-15


def test_bad_mappings_name_the_value():
    model, cluster, stats = toy_model(), toy_cluster(), toy_stats()
    with pytest.raises(ValueError, match="ep = 3 must divide dp = 4"):
        ParallelSpec(tp=1, dp=4, ep=3)
    with pytest.raises(ValueError, match="ep = 3 must divide the model's 4 experts"):
        step_cost(model, ParallelSpec(tp=2, dp=6, ep=3), cluster, stats)
    with pytest.raises(ValueError, match="dispatcher 'ring' is not one of flat, hierarchical"):
        ParallelSpec(dispatcher="ring")
    with pytest.raises(ValueError, match="overlap = 1.5 must be in"):
        ParallelSpec(overlap=1.5)
    with pytest.raises(ValueError, match="global batch 8 is not a multiple"):
        step_cost(model, ParallelSpec(tp=1, dp=0, ep=1), cluster, stats, nodes=3)


def test_presets_load_and_every_figure_has_a_source_and_status():
    assert {"dgx-h100", "hgx-h200", "h800", "ascend-910b", "ascend-910a"} <= set(available_presets("clusters"))
    for name in available_presets("clusters"):
        cluster = load_cluster(name)
        for figure_name, figure in cluster.figures.items():
            assert figure.source and figure.status, (name, figure_name)
        assert cluster.gemm_curve.source
    assert load_cluster("h800").value("intra_gbps") == 160 and load_cluster("h800").value("inter_gbps") == 50
    assert all(f.status == "assumed" for k, f in load_cluster("ascend-910b").figures.items()
               if k in ("intra_gbps", "inter_gbps"))
    mixtral = load_model("mixtral-8x7b")
    assert (mixtral.top_k, mixtral.d_model, mixtral.d_expert, mixtral.seq_len) == (1, 4096, 14336, 32768)
    # Mixtral 8x7B has 46.7 B parameters (public config; the LocMoE+ paper's figure).
    assert mixtral.total_params() / 1e9 == pytest.approx(46.7, rel=0.01)
    load_model("pangu-sigma-like")


def test_unknown_preset_and_bad_file_name_the_allowed_set(tmp_path):
    with pytest.raises(ValueError, match="cluster 'dgx-a100' is neither a preset .*dgx-h100"):
        load_cluster("dgx-a100")
    bad = tmp_path / "mine.toml"
    bad.write_text('name = "mine"\n[figures.peak_tflops]\nvalue = 1\n[gemm_curve]\npoints = [[1, 0.5]]\n')
    with pytest.raises(ValueError, match="lacks figures hbm_gbps"):
        load_cluster(str(bad))


def test_model_flops_per_token_by_hand():
    model = toy_model()
    active = 2 * (8 * 24) + 2 * 3 * 8 * 16 + 2 * 8 * 4 + 32 * 8
    assert model.model_flops_per_token() == pytest.approx(6 * active + 12 * 16 * 8 * 2)
    assert math.isfinite(model.model_flops_per_token())
