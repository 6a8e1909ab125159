"""Fine-tuning an exported EMO model with ``transformers.Trainer`` (EMO's subset workflow).

Checks: with ``num_items_in_batch`` the loss is the sum of token losses over the items of the
whole accumulated batch, so 2 steps of batch 4 equal 2 steps of batch 2 x accumulation 2 (logged
loss and weights), with right-padded sequences of unequal length; the router load-balancing loss
counts the tokens whose labels are set (``!= -100``) and is weighted by the micro-batch's share
of the items. HF-only (no megatron import): runs under transformers 4.57 and 5.x.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_hf_trainer.py -q``
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_tiny import TINY, random_hf_state_dict, write_hf_dir

SEQ = 16
LENGTHS = [16, 5, 12, 9, 16, 3, 14, 7]  # unequal item counts per micro-batch


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_trainer")
    write_hf_dir(path, random_hf_state_dict(seed=3))
    return path


def _load(path, **config_overrides):
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
    return model


class _Rows(torch.utils.data.Dataset):
    """Right-padded token rows; labels are -100 on padding."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.rows = []
        for n in LENGTHS:
            ids = torch.randint(2, TINY.vocab_size, (SEQ,), generator=gen)
            ids[n:] = TINY.pad_token_id
            mask = (torch.arange(SEQ) < n).long()
            labels = ids.masked_fill(mask == 0, -100)
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(path, out_dir, *, batch: int, accumulation: int):
    model = _load(path, output_router_logits=False)
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=7, data_seed=7,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulated_micro_batches_equal_the_whole_batch(hf_dir, tmp_path):
    losses_whole, weights_whole = _train(hf_dir, tmp_path / "a", batch=4, accumulation=1)
    losses_accum, weights_accum = _train(hf_dir, tmp_path / "b", batch=2, accumulation=2)
    assert len(losses_whole) == len(losses_accum) == 2
    assert losses_accum == pytest.approx(losses_whole, rel=1e-5)
    initial = _load(hf_dir).state_dict()
    moved = [k for k in weights_whole if not torch.equal(weights_whole[k], initial[k])]
    assert moved, "training changed no weight"
    for name, value in weights_whole.items():
        torch.testing.assert_close(weights_accum[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_with_num_items_and_label_masked_balancing(hf_dir):
    model = _load(hf_dir).eval()
    lb_fn = sys.modules[type(model).__module__].load_balancing_loss  # the exported file's own
    rows = _Rows()
    batch = {k: torch.stack([rows[i][k] for i in (0, 1)]) for k in rows[0]}
    labels = batch["labels"]
    valid_T = (labels != -100).reshape(-1)
    k = min(model.config.num_experts_per_tok, model.config.num_experts)
    num_shared = model.config.num_shared_experts
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=40, output_router_logits=True)
        no_attention_mask = model(input_ids=batch["input_ids"], labels=labels,
                                  output_router_logits=True)
    # Sum of the token losses / the items of the whole accumulated batch, plus the balancing
    # term weighted by this micro-batch's share of the items.
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    ce_sum = torch.nn.functional.cross_entropy(
        logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    coef = model.config.router_aux_loss_coef
    torch.testing.assert_close(out.loss, ce_sum / 40 + coef * out.aux_loss * valid_T.sum() / 40)
    # Balancing counts exactly the labelled tokens, whether or not an attention mask is given.
    expected = lb_fn([x[valid_T] for x in out.router_logits], k, num_shared)
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(no_attention_mask.aux_loss, expected)
    assert not torch.allclose(lb_fn(out.router_logits, k, num_shared), expected)
