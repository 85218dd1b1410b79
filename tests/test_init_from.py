"""Continued training with a router swap (``train.init_from``): every weight but the routers' comes
from the other run; shapes and tokenizer must fit, or the run is refused before it starts."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import cache_dir, tiny_config, tiny_flags  # noqa: F401 - cache_dir is a fixture

from locmoe.checkpoint import latest_checkpoint
from locmoe.cli import main
from locmoe.train import train


def test_a_topk_run_continues_as_locmoe_plus_keeping_every_other_weight(tmp_path, cache_dir):  # noqa: F811
    base = tiny_config(cache_dir, tmp_path / "base", router="topk", steps=3, eval_every=0)
    train(base)
    continued = tiny_config(cache_dir, tmp_path / "plus", router="locmoe_plus", steps=1, eval_every=0,
                            lr=1e-12, warmup_steps=0, init_from=str(tmp_path / "base"))
    train(continued)
    before = latest_checkpoint(tmp_path / "base")[1]["model"]
    after = latest_checkpoint(tmp_path / "plus")[1]["model"]
    shared = [key for key in before if ".router." not in key and before[key].is_floating_point()]
    assert any(".experts." in key for key in shared) and any("attn" in key for key in shared)
    for key in shared:  # one step at lr 1e-12 moves nothing visibly: the weights are the base's
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-9, msg=key)
    assert not any(key.endswith("router.gate.weight") for key in after)  # GrAP: no learned gate
    assert any(key.endswith("router.capacity_state") for key in after)


def test_incompatible_sources_are_refused_in_one_line(tmp_path, cache_dir, capsys):  # noqa: F811
    train(tiny_config(cache_dir, tmp_path / "base", router="switch", steps=1, eval_every=0))
    capsys.readouterr()
    assert main(["train", *tiny_flags(cache_dir), "--steps", "1", "--d-ff", "32", "--out", str(tmp_path / "wide"),
                 "--init-from", str(tmp_path / "base")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot initialise from" in error[0] and "experts.w_in" in error[0]
    assert main(["train", *tiny_flags(cache_dir), "--steps", "1", "--vocab-size", "600", "--out", str(tmp_path / "v"),
                 "--init-from", str(tmp_path / "base")]) == 2
    assert "data.vocab_size=600 but the given tokenizer has 512 ids; allowed: 512" in capsys.readouterr().err
    assert not (tmp_path / "wide").exists() and not (tmp_path / "v").exists()
    with pytest.raises(ValueError, match="no valid checkpoint"):
        train(tiny_config(cache_dir, tmp_path / "x", steps=1, init_from=str(tmp_path)))


def test_a_model_continues_on_another_corpus_with_its_own_tokenizer(tmp_path, cache_dir):  # noqa: F811
    """Pretrain on the embedded Python docs, continue on another text (a domain corpus) with a router
    swap: the continued run tokenises the new text with the base's tokenizer."""
    train(tiny_config(cache_dir, tmp_path / "base", router="topk", steps=2, eval_every=0))
    lines = [f"interface eth{i % 7} route {i * 13 % 97} via gateway {i % 11} mtu {1500 - i % 40}" for i in range(4000)]
    (tmp_path / "domain.txt").write_text("\n".join(lines))
    train(tiny_config(cache_dir, tmp_path / "domain", router="locmoe_plus", steps=2, eval_every=2,
                      corpus=str(tmp_path / "domain.txt"), init_from=str(tmp_path / "base")))
    base, domain = (latest_checkpoint(tmp_path / name)[1] for name in ("base", "domain"))
    assert domain["tokenizer"] == base["tokenizer"]
    assert domain["corpus_sha256"] != base["corpus_sha256"]
