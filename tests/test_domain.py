"""The domain preset (``locmoe compare --preset domain``) at tiny size: one base, continued per
router and seed from the same weights on a domain text, scored on held-out domain and general text."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from tiny_runs import cache_dir, tiny_config  # noqa: F401 - cache_dir is a fixture

from locmoe.checkpoint import latest_checkpoint
from locmoe.cli import main
from locmoe.compare.domain import continued_config, domain_claims, domain_plan, run_domain
from locmoe.compare.runner import parse_contenders
from locmoe.data import corpus as corpus_module
from locmoe.evaluation import ClozeSettings


def _domain_text(path: Path) -> Path:
    words = ["interface", "route", "packet", "socket", "netdev", "queue", "driver", "offload", "mtu", "vlan"]
    lines = [f"the {words[i % 10]} {words[i * 7 % 10]} of eth{i % 5} sets {words[i * 3 % 10]} {i % 97} "
             f"before {words[(i + 4) % 10]} ring {i % 13}" for i in range(6000)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _plan(tmp_path: Path, cache: Path, **overrides: object):
    start = tiny_config(cache, tmp_path / "unused")
    return domain_plan(tmp_path / "domain", {"corpus": str(_domain_text(tmp_path / "net.txt")), "steps": 3,
                                             "eval_every": 3, "checkpoint_every": 3, "warmup_steps": 1,
                                             **overrides},
                       parse_contenders(["topk", "switch", "locmoe_plus"]), (0, 1), base_steps=4,
                       cloze=ClozeSettings(12), base=start)


def test_every_router_continues_the_same_base_and_is_scored(tmp_path, cache_dir):  # noqa: F811
    plan = _plan(tmp_path, cache_dir)
    lines: list[str] = []
    report = run_domain(plan, on_run=lines.append)
    base_state = latest_checkpoint(plan.base.run_dir)[1]
    assert base_state["config"]["model"]["router"] == "topk" and base_state["config"]["model"]["top_k"] == 2
    assert base_state["config"]["model"]["capacity_factor"] == "dropless"
    assert len(report["runs"]) == 6 and {r["label"] for r in report["runs"]} == {"topk", "switch", "locmoe_plus"}
    for run in report["runs"]:
        config = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        assert config["train"]["init_from"] == str(plan.base.run_dir)
        assert config["data"]["data_seed"] == run["seed"] == config["train"]["seed"]
        assert run["domain"]["cloze_questions"] == 12 and 0 <= run["domain"]["cloze_accuracy"] <= 1
        assert run["general"]["corpus"].startswith("python-docs") and run["general"]["val_tokens"] > 0
        assert run["domain"]["corpus"].startswith(str(tmp_path / "net.txt"))
    # the base's own router continues with its settings; switch starts from its defaults
    topk = continued_config(plan, plan.contenders[0], 0).model
    switch = continued_config(plan, plan.contenders[1], 0).model
    assert (topk.top_k, topk.capacity_factor, topk.router_options) == (2, "dropless", {"renormalize": True})
    assert (switch.top_k, switch.capacity_factor, switch.router_options) == (None, "default", {})
    md = (plan.out_dir / "report.md").read_text()
    assert "base (pretrained only)" in md and "`locmoe_plus`" in md and "domain_qa_above_vs_switch" in md
    assert (plan.out_dir / "domain_val_loss.png").is_file()
    assert "## Iso-compute: LocMoE+ against Switch cut to about its slots" in md and "| `switch` |" in md
    names = ["domain_loss_within_tolerance", "fewer_expert_slots", "domain_qa_above", "general_loss_within_tolerance"]
    assert [c["name"] for c in report["claims"]] == [f"{n}_vs_{b}" for b in ("topk", "switch") for n in names]
    assert all(c["holds"] is None for c in report["claims"])  # 2 seeds: not tested
    # a re-run trains nothing and scores nothing again: it reads what is on disk
    stamps = {p: p.stat().st_mtime_ns for p in plan.out_dir.rglob("scores.json")}
    again: list[str] = []
    second = run_domain(plan, on_run=again.append,
                        train_fn=lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert {p: p.stat().st_mtime_ns for p in plan.out_dir.rglob("scores.json")} == stamps
    assert [r["domain"] for r in second["runs"]] == [r["domain"] for r in report["runs"]]


def _eval_json(args: list[str]) -> dict:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["eval", "--json", *args]) == 0
    return json.loads(buffer.getvalue())


def test_the_scores_are_the_checkpoints_own(tmp_path, cache_dir):  # noqa: F811
    """A run's domain score is ``locmoe eval --cloze`` of its checkpoint; the base's general score is
    ``locmoe eval --corpus python-docs`` of the base (its own corpus, named)."""
    plan = _plan(tmp_path, cache_dir)
    plan = type(plan)(plan.base, plan.continued, plan.contenders[:1], (0,), plan.cloze)
    report = run_domain(plan, on_run=lambda line: None)
    run = report["runs"][0]
    domain = _eval_json(["--checkpoint", run["run_dir"], "--cloze", "12"])
    assert domain["val_loss"] == pytest.approx(run["domain"]["val_loss"], rel=1e-6)
    assert domain["cloze_accuracy"] == run["domain"]["cloze_accuracy"]
    general = _eval_json(["--checkpoint", str(plan.base.run_dir), "--corpus", "python-docs"])
    assert general["val_loss"] == pytest.approx(report["base"]["general"]["val_loss"], rel=1e-6)
    assert general["corpus"].startswith("python-docs")
    base_domain = _eval_json(["--checkpoint", str(plan.base.run_dir), "--corpus", str(tmp_path / "net.txt"),
                              "--validation-fraction", "0.1", "--cloze", "12"])
    assert base_domain["val_loss"] == pytest.approx(report["base"]["domain"]["val_loss"], rel=1e-6)
    assert base_domain["cloze_accuracy"] == report["base"]["domain"]["cloze_accuracy"]


def test_the_claims_pair_seeds_and_decide_like_the_comparison():
    def run(label: str, seed: int, domain: float, general: float, cloze: float, slots: int,
            fingerprint: str | None = "init") -> dict:
        return {"label": label, "seed": seed, "tokens_processed": slots, "data_seed": 0,
                "init_fingerprint": f"{fingerprint}{seed}" if fingerprint else None,
                "domain": {"val_loss": domain, "cloze_accuracy": cloze}, "general": {"val_loss": general}}

    runs = [run("topk", s, 3.0, 2.0, 0.50, 2000) for s in range(3)]
    runs += [run("locmoe_plus", s, 3.0 + 0.001 * s, 2.005, 0.52 + 0.01 * s, 900) for s in range(3)]
    claims = {c["name"]: c for c in domain_claims(runs)}
    assert set(claims) == {"domain_loss_within_tolerance_vs_topk", "fewer_expert_slots_vs_topk",
                           "domain_qa_above_vs_topk", "general_loss_within_tolerance_vs_topk"}  # no switch runs
    # Domain loss differences 0, 0.001, 0.002 nats: mean 0.001, 95 % t-interval upper bound
    # 0.001 + 4.303 · 0.001/√3 = 0.0035 < 0.01 nats: better.
    assert claims["domain_loss_within_tolerance_vs_topk"]["details"]["ci95"][1] == pytest.approx(
        0.001 + 4.302653 * 0.001 / 3 ** 0.5, rel=1e-5)
    assert claims["domain_loss_within_tolerance_vs_topk"]["verdict"] == "better"
    assert claims["fewer_expert_slots_vs_topk"]["holds"] is True  # 55 % fewer on every seed, target 40 %
    assert claims["fewer_expert_slots_vs_topk"]["details"]["per_seed"] == pytest.approx([0.55] * 3)
    assert claims["fewer_expert_slots_vs_topk"]["details"]["paired"] is True
    assert claims["domain_qa_above_vs_topk"]["holds"] is True
    assert claims["general_loss_within_tolerance_vs_topk"]["holds"] is True
    worse = runs[:3] + [run("locmoe_plus", s, 3.2, 2.0, 0.45, 900) for s in range(3)]
    claims = {c["name"]: c for c in domain_claims(worse)}
    assert claims["domain_loss_within_tolerance_vs_topk"]["verdict"] == "worse"
    assert claims["domain_qa_above_vs_topk"]["holds"] is False
    assert domain_claims(runs[:3])[0]["holds"] is None  # no LocMoE+ runs: not measured
    switch = [run("switch", s, 3.1, 2.0, 0.5 + 0.02 * s, 950) for s in range(2)]  # seeds 0 and 1 only
    claims = {c["name"]: c for c in domain_claims(runs + switch)}
    assert claims["fewer_expert_slots_vs_switch"]["details"]["seeds"] == 2
    assert claims["fewer_expert_slots_vs_switch"]["holds"] is None  # 2 paired seeds: not tested
    assert "not tested" in claims["domain_qa_above_vs_switch"]["measured"]
    # Runs without fingerprints (trained before paired initialisation) are compared unpaired.
    unpaired = [run("topk", s, 3.0, 2.0, 0.50, 2000, None) for s in range(3)] + runs[3:]
    claims = {c["name"]: c for c in domain_claims(unpaired)}
    assert claims["domain_qa_above_vs_topk"]["details"]["paired"] is False
    assert "unpaired, Welch" in claims["domain_qa_above_vs_topk"]["measured"]


def test_an_unfetchable_domain_corpus_is_one_line_and_exit_2_with_nothing_written(tmp_path, monkeypatch, capsys):
    failing = tmp_path / "fetch.sh"
    failing.write_text("echo 'E: Unable to locate package linux-doc' >&2\nexit 100\n")
    monkeypatch.setattr(corpus_module, "FETCH_SCRIPT", failing)
    monkeypatch.setattr(corpus_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    out = tmp_path / "domain"
    assert main(["compare", "--preset", "domain", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--seeds", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    expected = "cannot be fetched: E: Unable to locate package linux-doc (apt-get update may help)"
    assert error[-1].endswith(expected), error
    assert len([line for line in error if not line.startswith("fetching")]) == 1
    assert not out.exists() and not (tmp_path / "cache" / "corpora" / "linux-docs-networking.txt").exists()


def test_without_apt_the_linux_corpus_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module.shutil, "which", lambda name: None)
    with pytest.raises(corpus_module.CorpusUnavailable, match="needs apt-get and dpkg-deb"):
        corpus_module.load_corpus("linux-docs", tmp_path)


def test_a_cached_linux_corpus_is_checked_against_its_sums(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "fetch_linux_docs", lambda cache: pytest.fail("fetched a cached corpus"))
    folder = tmp_path / "corpora"
    folder.mkdir()
    (folder / "linux-docs-networking.txt").write_text("netdev queues\n")
    digest = corpus_module.sha256_hex(b"netdev queues\n")
    (folder / "SHA256SUMS").write_text(f"{digest}  linux-docs-networking.txt\n")
    assert corpus_module.load_corpus("linux-docs-networking", tmp_path).text == "netdev queues\n"
    (folder / "linux-docs-networking.txt").write_text("netdev queues!\n")
    with pytest.raises(ValueError, match="is corrupt"):
        corpus_module.load_corpus("linux-docs-networking", tmp_path)


def test_preset_flags_are_checked(tmp_path, capsys):
    assert main(["compare", "--preset", "domain", "--top-k", "1", "--out", str(tmp_path / "d")]) == 2
    assert "fixed by the domain preset" in capsys.readouterr().err
    assert main(["compare", "--preset", "domain", "--base-steps", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--base-steps='0' is invalid; allowed: an integer >= 1" in capsys.readouterr().err
    assert main(["compare", "--quick", "--cloze", "5", "--out", str(tmp_path / "d")]) == 2
    assert "--cloze belongs to the domain preset" in capsys.readouterr().err
    assert main(["compare", "--preset", "domain", "--routers", "locmoe_plus,switch@matched",
                 "--out", str(tmp_path / "d")]) == 2
    assert "@matched is not available in the domain preset" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--validation-fraction", "0.1"]) == 2
    assert "--validation-fraction needs --corpus" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_init_router_matching_keeps_a_gate_of_the_same_shape_and_fresh_rebuilds_it(tmp_path, cache_dir):  # noqa: F811
    from locmoe.train import train

    train(tiny_config(cache_dir, tmp_path / "base", router="topk", steps=3, eval_every=0))
    gates = {k: v for k, v in latest_checkpoint(tmp_path / "base")[1]["model"].items() if k.endswith("gate.weight")}
    for router, mode, kept in (("topk", "matching", True), ("switch", "matching", True), ("switch", "fresh", False)):
        out = tmp_path / f"{router}-{mode}"
        train(tiny_config(cache_dir, out, router=router, steps=1, eval_every=0, lr=1e-12, warmup_steps=0,
                          init_from=str(tmp_path / "base"), init_router=mode))
        after = latest_checkpoint(out)[1]["model"]
        for key, value in gates.items():
            close = torch.allclose(after[key], value, rtol=1e-6, atol=1e-9)
            assert close == kept, (router, mode, key)


def test_the_default_routers_include_switch_cut_to_about_locmoe_plus_slots(tmp_path):
    plan = domain_plan(tmp_path / "out", {}, None, None, None, None, None)
    factors = {c.label: c.capacity_factor for c in plan.contenders}
    assert factors["switch@cf0.95"] == 0.95 and factors["switch@cf0.8"] == 0.8
    assert {"topk", "switch", "locmoe", "locmoe_plus"} <= set(factors)
