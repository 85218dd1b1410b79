"""Continue training a Hugging Face MoE model with LocMoE+ routing, in a plain PyTorch loop or the HF Trainer.

    python examples/hf_router_swap.py --model PATH_OR_HUB_NAME --router locmoe_plus --steps 100
    python examples/hf_router_swap.py --tiny --steps 30 --save DIR   # a tiny random Mixtral, no download
    python examples/hf_router_swap.py --tiny --steps 30 --trainer hf   # the same through transformers.Trainer

The model's sparse MoE blocks are swapped for locmoe layers that reuse its expert weights
(``locmoe.hf.replace_moe_blocks``); the training loss then includes locmoe's router losses, and the
attention mask keeps padding out of routing. The data is the text of locmoe's embedded corpus
(the Python documentation) tokenised with the model's own tokenizer, or, with ``--tiny``, counting
sequences (a random start and step, so a model can learn them in a few dozen steps). After training,
``--save DIR`` writes the model with ``save_pretrained`` when its router has a Hugging Face
equivalent (``topk``, or ``deepseek`` on DeepSeek-V3; ``locmoe.hf.export_hf``), else with
``locmoe.hf.save_locmoe`` (config, router and options, weights and router state), which
``locmoe.hf.load_locmoe`` rebuilds.

It prints progress and a short summary; the full record (every step's loss, the save, and with
``--save`` the logits of a fixed probe to check a reload against) goes to ``--json PATH``, by default
``DIR/hf_router_swap.json`` when saving.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from locmoe.data.corpus import load_corpus  # noqa: E402
from locmoe.hf import (  # noqa: E402
    export_hf,
    locmoe_blocks,
    register_after_optimizer_step,
    replace_moe_blocks,
    save_locmoe,
)
from locmoe.metrics import LayerMetric  # noqa: E402

PROBE_LENGTH = 8
RECORD_NAME = "hf_router_swap.json"  # the record's file in the --save folder when --json is not given
# Default learning rates: a tiny random model learns from scratch; a pretrained one is only adjusted
# to its new routing, and a large step would undo its training.
TINY_LR, PRETRAINED_LR = 3e-3, 1e-4


def tiny_mixtral(vocab: int = 64) -> transformers.PreTrainedModel:
    """A tiny random Mixtral (4 experts, top-2) for trying the swap without a download."""
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=vocab, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
    )
    return transformers.MixtralForCausalLM(config)


def batches(args: argparse.Namespace, vocab: int, generator: torch.Generator):  # noqa: ANN201
    """``(input_ids, attention_mask)`` batches: corpus windows (the model's tokenizer), or for ``--tiny``
    counting sequences ``start + step · t`` over the ids ``3 .. vocab-1`` (0-2: pad, bos, eos), random
    start and step in 1-4, with ragged lengths (right padding)."""
    if args.tiny:
        span = vocab - 3
        positions = torch.arange(args.seq_len)[None, :]
        while True:
            starts = torch.randint(0, span, (args.batch_size, 1), generator=generator)
            steps = torch.randint(1, 5, (args.batch_size, 1), generator=generator)
            ids = 3 + (starts + steps * positions) % span
            lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (args.batch_size,), generator=generator)
            mask = (torch.arange(args.seq_len)[None, :] < lengths[:, None]).long()
            yield ids.masked_fill(mask == 0, 0), mask
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    text = load_corpus("python-docs", max_chars=args.max_chars).text
    tokens = torch.tensor(tokenizer(text)["input_ids"])
    windows = tokens.numel() // args.seq_len
    while True:
        starts = torch.randint(0, windows, (args.batch_size,), generator=generator) * args.seq_len
        ids = torch.stack([tokens[s : s + args.seq_len] for s in starts.tolist()])
        yield ids, torch.ones_like(ids)


def train_in_a_loop(model: transformers.PreTrainedModel, data, args: argparse.Namespace) -> list[float]:  # noqa: ANN001
    """A plain PyTorch loop; the per-step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # after the swap: the new parameters
    register_after_optimizer_step(optimizer, model)  # routers' per-step state (deepseek's bias) after each step
    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        ids, mask = next(data)
        labels = ids.masked_fill(mask == 0, -100)  # no loss on padding
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # includes locmoe's router losses
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            kept = [block.moe.last_metrics[LayerMetric.DROP_RATE] for _, block in locmoe_blocks(model)]
            print(f"step {step}/{args.steps}  loss {losses[-1]:.4f}  drop {sum(kept) / len(kept):.3f}", flush=True)
    return losses


class Rows(torch.utils.data.IterableDataset):
    """The batches as rows for the Trainer (it batches them again: same data, same order)."""

    def __init__(self, data) -> None:  # noqa: ANN001
        super().__init__()
        self.data = data

    def __iter__(self):  # noqa: ANN204
        for ids, mask in self.data:
            labels = ids.masked_fill(mask == 0, -100)
            for row_ids, row_mask, row_labels in zip(ids, mask, labels, strict=True):
                yield {"input_ids": row_ids, "attention_mask": row_mask, "labels": row_labels}


def train_with_trainer(model: transformers.PreTrainedModel, data, args: argparse.Namespace) -> list[float]:  # noqa: ANN001
    """The same training through ``transformers.Trainer`` (needs ``accelerate``); the per-step losses.

    The Trainer's loss is ``outputs.loss``, which already holds locmoe's router losses. Its own
    checkpoints are off: ``save_pretrained`` cannot describe a locmoe router, so the model is saved at
    the end with ``export_hf`` or ``save_locmoe`` (``--save``)."""
    settings = transformers.TrainingArguments(
        output_dir=str(Path(args.save or ".") / "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = transformers.Trainer(model=model, args=settings, train_dataset=Rows(data))
    register_after_optimizer_step(trainer.create_optimizer(), model)  # deepseek's bias moves after each step
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local folder or hub name of a Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE or "
                        "DeepSeek-V3 model")
    source.add_argument("--tiny", action="store_true", help="a tiny random Mixtral instead")
    parser.add_argument("--router", default="locmoe_plus")
    parser.add_argument("--router-options", default="{}", help='JSON, e.g. \'{"tau": 0.8}\'')
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float,
                        help=f"learning rate (default {TINY_LR:g} with --tiny, else {PRETRAINED_LR:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    parser.add_argument("--save", help="folder to save the trained model in")
    parser.add_argument("--json", type=Path,
                        help=f"file for the full record (default: {RECORD_NAME} in --save's folder)")
    parser.add_argument("--trainer", choices=("loop", "hf"), default="loop",
                        help="a plain PyTorch loop, or transformers.Trainer (needs accelerate)")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = TINY_LR if args.tiny else PRETRAINED_LR

    torch.manual_seed(args.seed)
    model = tiny_mixtral() if args.tiny else transformers.AutoModelForCausalLM.from_pretrained(args.model)
    swapped = replace_moe_blocks(model, args.router, **json.loads(args.router_options))
    data = batches(args, model.config.vocab_size, torch.Generator().manual_seed(args.seed))
    started = time.perf_counter()
    losses = train_with_trainer(model, data, args) if args.trainer == "hf" else train_in_a_loop(model, data, args)
    result = {"model": "tiny" if args.tiny else args.model, "router": args.router,
              "router_options": json.loads(args.router_options), "trainer": args.trainer, "lr": args.lr,
              "swapped_blocks": swapped, "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
              "seconds": time.perf_counter() - started, "save": args.save}
    if args.save:
        # Logits of a fixed probe in eval mode, to check a reload (load_locmoe / from_pretrained) against.
        model.eval()
        with torch.no_grad():
            probe = (3 + torch.arange(PROBE_LENGTH)[None, :]) % model.config.vocab_size  # 0-2: pad, bos, eos
            result["probe_logits"] = model(input_ids=probe).logits[0].tolist()
        try:
            export_hf(model).save_pretrained(args.save)
            result["saved"] = "save_pretrained"
        except ValueError as reason:  # a router with no Hugging Face equivalent: locmoe's own format
            save_locmoe(model, args.save)  # locmoe.hf.load_locmoe(args.save) rebuilds it
            result["saved"] = "save_locmoe"
            result["why_not_save_pretrained"] = str(reason)
    assert all(math.isfinite(loss) for loss in losses), "the loss became non-finite"
    record_path = args.json or (Path(args.save) / RECORD_NAME if args.save else None)
    if record_path is not None:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(summary(result, record_path))
    return result


def summary(result: dict, record_path: Path | None) -> str:
    """A few lines for the terminal: what was swapped, how the loss moved, where things went."""
    blocks = result["swapped_blocks"]
    lines = [
        f"swapped {len(blocks)} MoE blocks to {result['router']}: {', '.join(blocks)}",
        f"trained {len(result['losses'])} steps ({result['trainer']}, lr {result['lr']:g}) in "
        f"{result['seconds']:.1f} s: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}",
    ]
    if result.get("saved") == "save_pretrained":
        lines.append(f"saved to {result['save']} with save_pretrained (reload: from_pretrained)")
    elif result.get("saved") == "save_locmoe":
        lines.append(f"saved to {result['save']} with locmoe.hf.save_locmoe, as {result['router']} has no Hugging "
                     "Face equivalent (reload: locmoe.hf.load_locmoe)")
    if record_path is not None:
        lines.append(f"full record: {record_path}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
