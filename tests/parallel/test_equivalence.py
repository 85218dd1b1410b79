"""4 ranks with expert parallelism = one process on the same global batch (SPEC §7 correctness bar).

Routing groups: capacity and every selection are computed per routing group, so the one-process
reference routes exactly the groups the parallel run routes:

* ``routing_scope="local"``: each rank's tokens are one group. The reference runs, for each rank's
  slice of the global batch, a fresh copy of the initial layer (stateful routers such as ``locmoe``
  fix their capacity from their own first batch, as each rank does) and sums the objectives.
* ``routing_scope="global"``: all tokens of the expert-parallel group are one group; the reference
  runs one layer on the whole global batch. Every rank reports the group's aux loss, so the
  reference objective counts it once per rank.

Each rank holds 12, 16, 5 and 9 tokens (uneven splits); ranks sit on 2 simulated nodes of 2 ranks
(the hierarchical all-to-all uses all three hops). Objective per rank: ``Σ out·w + aux_loss`` with a
fixed random ``w``; gradients are summed over ranks (``reduction="sum"``) and compared with the
reference's: outputs, input gradients, router gradients, this rank's expert gradients, the aux loss
and the global gradient norm, to fp32 tolerance.
"""

from __future__ import annotations

import pytest
from parallel.ep_harness import read_results, spawn
from parallel.workers import equivalence_worker

WORLD_SIZE = 4
ROUTERS = ["switch", "topk", "expert_choice", "hash", "locmoe", "locmoe_plus", "tcr", "ecr"]
CASES = (
    [{"name": f"{router}-flat-pad", "router": router} for router in ROUTERS]
    + [{"name": f"{router}-hierarchical-pack", "router": router, "hierarchical": True, "dispatch": "pack"}
       for router in ROUTERS]
    + [
        {"name": "topk-dropless-swiglu", "router": "topk", "options": {"capacity_factor": None},
         "activation": "swiglu", "dispatch": "pack"},
        {"name": "switch-global", "router": "switch", "routing_scope": "global"},
        {"name": "topk-global-hierarchical", "router": "topk", "routing_scope": "global", "hierarchical": True},
        {"name": "locmoe_plus-global", "router": "locmoe_plus", "routing_scope": "global"},
        {"name": "locmoe_plus-global-hierarchical", "router": "locmoe_plus", "routing_scope": "global",
         "hierarchical": True, "dispatch": "pack"},
        {"name": "switch-last-rank-starved", "router": "switch", "starve_last_rank": True},
        {"name": "switch-last-rank-starved-hierarchical", "router": "switch", "starve_last_rank": True,
         "hierarchical": True},
    ]
)
ABSOLUTE, RELATIVE = 1e-5, 1e-5


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    spawn(equivalence_worker, WORLD_SIZE, out, str(out), CASES)
    return read_results(out, WORLD_SIZE)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_expert_parallel_matches_one_process(outcomes, case):
    for rank, results in enumerate(outcomes):
        result = results[case["name"]]
        tolerance = ABSOLUTE + RELATIVE * result["scale"]
        failed = {name: error for name, error in result["errors"].items() if not error <= tolerance}
        assert not failed, f"rank {rank}: {failed} (tolerance {tolerance:.2e})"
        assert result["expert_ids"] == [2 * rank, 2 * rank + 1]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_expert_parallel_computes_the_one_process_slots(outcomes, case):
    """Summed over ranks, the slots the experts compute equal the one-process layers' on the same
    routing groups: n·C per group for pad, the kept assignments for pack (a dropless pad plan pads
    each rank to its own largest load, so it is left out)."""
    if case.get("dispatch", "pad") == "pad" and case.get("options", {}).get("capacity_factor", 1) is None:
        pytest.skip("dropless pad pads to each rank's largest load")
    computed = sum(results[case["name"]]["processed_slots"] for results in outcomes)
    assert {results[case["name"]]["reference_slots"] for results in outcomes} == {computed}


def test_comparisons_cover_router_and_expert_gradients(outcomes):
    names = set(outcomes[0]["switch-flat-pad"]["errors"])
    assert {"output", "input_grad", "aux_loss", "grad_norm", "router.gate.weight.grad", "experts.w_in.grad",
            "experts.w_out.grad"} <= names
    assert "experts.w_gate.grad" in outcomes[0]["topk-dropless-swiglu"]["errors"]


def test_uneven_splits_and_empty_experts_occur(outcomes):
    for name in ("switch-flat-pad", "topk-flat-pad"):
        received = [results[name]["received_tokens"] for results in outcomes]
        assert len(set(received)) > 1, f"{name}: ranks received {received}, expected uneven splits"
    loads = outcomes[0]["switch-last-rank-starved"]["tokens_per_expert"]
    assert loads[-2:] == [0, 0]


@pytest.mark.parametrize("name", ["switch-last-rank-starved", "switch-last-rank-starved-hierarchical"])
def test_a_rank_that_receives_no_tokens_still_matches(outcomes, name):
    assert outcomes[-1][name]["received_tokens"] == 0
    assert all(results[name]["received_tokens"] > 0 for results in outcomes[:-1])
