"""Expert-sharded checkpoints (issue 5.6): save on 4 ranks, resume on 2 ranks or 1 process with the
losses of the run that never stopped; checkpoints whose experts do not match are refused.

The model is a small LM around one MoE layer (``workers.TinyLM``: embedding, switch MoE, head),
Adam, gradient clipping, the same global batch of 8 sequences per step split over the ranks. The
MoE layer routes with ``routing_scope="global"`` so its routing group (all 48 tokens of the step)
is the same on any number of ranks; with per-rank routing groups the groups themselves, and so
capacities and drops, would change with the number of ranks.
"""

from __future__ import annotations

import pytest
import torch
from parallel.ep_harness import read_results, spawn
from parallel.workers import TinyLM, build_tiny_lm, checkpoint_worker, train_tiny_lm

from locmoe.parallel import ExpertParallelGroups
from locmoe.parallel.checkpoint import (
    consolidated_state_dict,
    load_consolidated_optimizer_state,
    load_consolidated_state_dict,
    merge_expert_shards,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint")
    spawn(checkpoint_worker, 4, out, str(out), "save")
    return out, read_results(out, 4)


def test_resume_on_two_ranks_continues_the_uninterrupted_run(saved_run):
    out, uninterrupted = saved_run
    (out / "resume2").mkdir()
    spawn(checkpoint_worker, 2, out, str(out), "resume")
    resumed = read_results(out / "resume2", 2)
    for result in resumed:
        assert result["after"] == pytest.approx(uninterrupted[0]["after"], abs=TOLERANCE)


def test_resume_on_one_process_continues_the_uninterrupted_run(saved_run):
    out, uninterrupted = saved_run
    groups = ExpertParallelGroups.single_process()
    model, optimizer = build_tiny_lm(groups)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    load_consolidated_state_dict(model, state["model"], groups)
    load_consolidated_optimizer_state(model, optimizer, state["optimizer"])
    losses = train_tiny_lm(model, optimizer, groups, range(4, 7))
    assert losses == pytest.approx(uninterrupted[0]["after"], abs=TOLERANCE)


def test_a_plain_single_process_model_loads_the_consolidated_checkpoint(saved_run):
    """The consolidated state has the single-process model's keys: an unsharded MoELayer loads it."""
    out, _ = saved_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model = TinyLM()
    load_consolidated_state_dict(model, state["model"])
    assert torch.equal(model.moe.experts.w_in, state["model"]["moe.experts.w_in"])


def test_the_losses_move(saved_run):
    """Guard against a vacuous comparison: training changes the loss from step to step."""
    _, uninterrupted = saved_run
    losses = uninterrupted[0]["before"] + uninterrupted[0]["after"]
    assert len(set(round(value, 6) for value in losses)) == len(losses)
    assert all(result["after"] == uninterrupted[0]["after"] for result in uninterrupted)


def _shards(out):
    return [torch.load(out / f"shard{rank}.pt", weights_only=True) for rank in range(4)]


def test_per_rank_shards_record_their_global_experts_and_merge(saved_run):
    out, _ = saved_run
    shards = _shards(out)
    assert [shard["moe.expert_ids"].tolist() for shard in shards] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    merged = merge_expert_shards(shards[::-1])  # any order: the ids say where each expert goes
    consolidated = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert merged.keys() == consolidated.keys()
    for key, value in consolidated.items():
        assert torch.equal(merged[key], value), key


def test_a_checkpoint_with_other_experts_is_refused(saved_run):
    out, _ = saved_run
    shards = _shards(out)
    model = TinyLM()
    with pytest.raises(ValueError, match=r"holds experts \[2, 3\].*refusing"):
        load_consolidated_state_dict(model, shards[1])  # one rank's shard is not a whole layer
    with pytest.raises(ValueError, match="refusing"):
        merge_expert_shards(shards[:3], num_experts=8)  # a missing rank
    with pytest.raises(ValueError, match="has 8 experts"):
        load_consolidated_state_dict(model, merge_expert_shards(shards[:3]))  # 6 experts merged, 8 expected
    with pytest.raises(ValueError, match="refusing"):
        merge_expert_shards([shards[0], shards[0], shards[2], shards[3]])  # an expert twice
    torch.manual_seed(0)
    fewer = TinyLM()
    fewer.moe = type(fewer.moe)(16, 24, 4)  # a model with 4 experts
    with pytest.raises(ValueError, match="has 4 experts"):
        load_consolidated_state_dict(fewer, consolidated_state_dict(TinyLM()))
    wider = TinyLM()
    wider.moe = type(wider.moe)(16, 32, 8)  # same experts, another inner size
    with pytest.raises(ValueError, match="experts.w_in has shape"):
        load_consolidated_state_dict(wider, consolidated_state_dict(TinyLM()))
