"""DeepSeek's bias in a Hugging Face model trained by ``transformers.Trainer``: the optimiser hook
(:func:`locmoe.hf.register_after_optimizer_step`) moves every swapped router's bias once per
optimiser step, from the real tokens of all the step's accumulated micro-batches."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from locmoe.hf import locmoe_blocks, register_after_optimizer_step, replace_moe_blocks  # noqa: E402
from locmoe.routing.deepseek import DeepSeekRouter  # noqa: E402

VOCAB, SEQ, ROWS, ACCUMULATION, STEPS = 64, 12, 2, 3, 2


class Rows(torch.utils.data.Dataset):
    """Random ids, right-padded to ragged lengths (padding routes nowhere and counts no load)."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (count, SEQ), generator=generator)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (count,), generator=generator)
        self.mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index].masked_fill(self.mask[index] == 0, 0)
        return {"input_ids": ids, "attention_mask": self.mask[index], "labels": ids.masked_fill(ids == 0, -100)}


def test_the_trainer_moves_the_bias_once_per_optimiser_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
    )
    model = transformers.MixtralForCausalLM(config)
    replace_moe_blocks(model, "deepseek", bias_update_rate=0.01)
    loads: list[float] = []
    update = DeepSeekRouter.update_bias

    def recorded(self: DeepSeekRouter, group=None) -> None:  # noqa: ANN001
        loads.append(float(self.pending_load.sum()))
        update(self, group)

    monkeypatch.setattr(DeepSeekRouter, "update_bias", recorded)
    data = Rows(ROWS * ACCUMULATION * STEPS)
    settings = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=ROWS,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=settings, train_dataset=data)
    register_after_optimizer_step(trainer.create_optimizer(), model)
    trainer.train()
    layers = len(locmoe_blocks(model))
    assert len(loads) == STEPS * layers == 4
    # Each step's loads: k proposals per real token of the step's micro-batches, whichever order the
    # Trainer drew the rows in (every row is used once over the two steps).
    assert sum(loads) == layers * 2 * int(data.mask.sum())
    biases = [block.moe.router.score_bias for _, block in locmoe_blocks(model)]
    assert all(bias.abs().max() > 0 for bias in biases)
