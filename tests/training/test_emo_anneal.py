"""EMO-anneal: a ``--emo-routing standard`` checkpoint resumed under ``--emo-routing emo``.

A tiny standard MoE trains 4 iterations and saves (weights and optimizer); the anneal run loads
it with the flags of ``examples/06_emo_anneal.sh`` (``--override-opt_param-scheduler``, WSD
decay over the anneal) under EMO routing and trains 2 more iterations, then exports to HF.
Checked: the iteration count continues (steps 5-6, checkpoint at 6), routing now uses document
pools (pool size below the 7 routed experts, standard used all 7), the optimizer state was
loaded (Adam's second moment after the anneal is at least beta2^2 times the standard run's,
element by element, which a fresh optimizer's is not), the learning rate follows the anneal
schedule, and the export loads in transformers.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_emo_anneal.py -q``
"""

from __future__ import annotations

import os

import pytest
import torch

from train_runs import check, make_corpus, run_train, tb_scalars, train_args

BASE_ITERS, ANNEAL_ITERS = 4, 2
BETA2 = 0.999  # Megatron's default --adam-beta2 (train_args does not set it)


def _adam_second_moment(ckpt_dir: str, iteration: int, key: str) -> torch.Tensor:
    """One optimizer tensor of a torch_dist checkpoint, read without a process group."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(ckpt_dir, f"iter_{iteration:07d}")
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata[key]
    out = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
    dcp.load(out, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return out[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("anneal")
    corpus = make_corpus(str(root / "docs"))
    std, ann = str(root / "std"), str(root / "ann")
    check(run_train(train_args(corpus, std, train_iters=BASE_ITERS, extra=[
        "--emo-routing", "standard", "--save", os.path.join(std, "ckpt"),
        "--save-interval", str(BASE_ITERS)])))
    total = BASE_ITERS + ANNEAL_ITERS
    proc = check(run_train(train_args(corpus, ann, train_iters=total, extra=[
        "--emo-routing", "emo", "--load", os.path.join(std, "ckpt"),
        "--override-opt_param-scheduler", "--lr-warmup-iters", "0",
        "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
        "--lr-wsd-decay-iters", str(ANNEAL_ITERS), "--lr-decay-iters", str(total),
        "--save", os.path.join(ann, "ckpt"), "--save-interval", str(total)])))
    return std, ann, proc


def test_anneal_resumes_standard_checkpoint_under_emo_routing(runs):
    std, ann, proc = runs
    base, anneal = tb_scalars(os.path.join(std, "tb")), tb_scalars(os.path.join(ann, "tb"))
    assert sorted(anneal["lm loss"]) == [5, 6]
    assert f"loading distributed checkpoint from {os.path.join(std, 'ckpt')} at iteration 4" \
        in proc.stdout
    with open(os.path.join(ann, "ckpt", "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "6"
    for layer in (1, 2):
        assert base[f"emo/pool_size_mean/layer_{layer}"][BASE_ITERS] == 7.0
        assert 2.0 <= anneal[f"emo/pool_size_mean/layer_{layer}"][6] < 7.0
    # WSD over the anneal: step 5 decays 1/2 of the way from --lr 3e-3 to --min-lr 3e-4.
    assert anneal["learning-rate"][5] == pytest.approx(3e-3 - 0.5 * (3e-3 - 3e-4))
    key = "optimizer.state.exp_avg_sq.decoder.layers.mlp.router.weight"
    v_base = _adam_second_moment(os.path.join(std, "ckpt"), BASE_ITERS, key)
    v_ann = _adam_second_moment(os.path.join(ann, "ckpt"), BASE_ITERS + ANNEAL_ITERS, key)
    # Loaded: v6 = b2^2 v4 + (1 - b2)(b2 g5^2 + g6^2) >= b2^2 v4. Fresh: v6 = (1 - b2)(...),
    # far below b2^2 v4 (the base run accumulated 4 steps of (1 - b2) g^2).
    assert (v_ann >= BETA2 ** 2 * v_base * (1 - 1e-5)).all()
    assert v_base.abs().sum() > 0


def test_annealed_checkpoint_exports_to_hf(runs, tmp_path):
    from megatron_emo.conversion.to_hf import export_to_hf
    from megatron_emo.subsets.sources import load_hf_model

    _, ann, _ = runs
    export_to_hf(os.path.join(ann, "ckpt"), str(tmp_path / "hf"), print_fn=lambda m: None)
    model = load_hf_model(str(tmp_path / "hf"))
    with torch.no_grad():
        logits = model(torch.randint(0, 127, (1, 12))).logits
    assert logits.shape == (1, 12, 128) and torch.isfinite(logits).all()
