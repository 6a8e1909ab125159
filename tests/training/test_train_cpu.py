"""``python -m megatron_emo.train --cpu`` on a tiny model and corpus (1-2 gloo ranks).

pretrain() smoke, resume equality, EP resharding, the standard-MoE baseline and start-up refusals.

Each run is a subprocess (about 15-30 s on 2 cores). Run:
``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_train_cpu.py -q``
"""

from __future__ import annotations

import os

import pytest

from train_runs import check, make_corpus, run_train, tb_scalars, train_args

ITERS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("data") / "docs"))


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """EP=1, 8 iterations, checkpoints at 4 and 8."""
    out = str(tmp_path_factory.mktemp("base"))
    args = train_args(corpus, out, train_iters=ITERS,
                      extra=["--save", os.path.join(out, "ckpt"), "--save-interval", "4"])
    proc = check(run_train(args))
    return out, proc, tb_scalars(os.path.join(out, "tb"))


def _losses(scalars, steps):
    return [scalars["lm loss"][s] for s in steps]


def test_smoke_loss_decreases_checkpoint_and_metrics(base_run):
    out, proc, scalars = base_run
    losses = _losses(scalars, range(1, ITERS + 1))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    with open(os.path.join(out, "ckpt", "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(ITERS)
    # Routing diagnostics at every logging step: a live check that routing stays in the pools.
    for step in range(1, ITERS + 1):
        assert scalars["emo/in_pool_fraction"][step] == 1.0
        for layer in (1, 2):
            pool = scalars[f"emo/pool_size_mean/layer_{layer}"][step]
            assert 2.0 <= pool <= 7.0
            assert 1.0 <= scalars[f"emo/experts_per_document/layer_{layer}"][step] <= 7.0
    assert scalars["emo/expert_load_max_over_mean"][ITERS] >= 1.0
    assert "load_balancing_loss" in scalars and "z_loss" in scalars
    assert "[EMO routing] iteration" in proc.stdout


def test_resume_gives_identical_losses_and_pools(base_run, corpus, tmp_path):
    """Resuming the step-4 checkpoint reproduces steps 5-8 exactly, pool sizes included."""
    out, _, base = base_run
    args = train_args(corpus, str(tmp_path), train_iters=ITERS,
                      extra=["--load", os.path.join(out, "ckpt"), "--ckpt-step", "4"])
    check(run_train(args))
    resumed = tb_scalars(os.path.join(tmp_path, "tb"))
    steps = range(5, ITERS + 1)
    assert _losses(resumed, steps) == _losses(base, steps)
    for layer in (1, 2):
        tag = f"emo/pool_size_mean/layer_{layer}"
        assert [resumed[tag][s] for s in steps] == [base[tag][s] for s in steps]


@pytest.fixture(scope="module")
def ep2_resumed_run(base_run, corpus, tmp_path_factory):
    """EP=2 over 2 gloo ranks, resuming the EP=1 step-4 checkpoint's weights; saves at 6 and 8.

    NOTE: Megatron's non-distributed optimizer state does not reshard across EP sizes
    (``optimizer.py:1579``: "Expected 2 entries in state dict, but got 4"), so EP changes load
    the weights only (``--no-load-optim``) and compare the next step's loss, which depends on
    the weights and the batch alone.
    """
    out, _, _ = base_run
    ep2 = str(tmp_path_factory.mktemp("ep2"))
    args = train_args(corpus, ep2, train_iters=ITERS, extra=[
        "--expert-model-parallel-size", "2", "--load", os.path.join(out, "ckpt"),
        "--ckpt-step", "4",
        "--no-load-optim", "--no-load-rng",
        "--save", os.path.join(ep2, "ckpt"), "--save-interval", "2",
    ])
    check(run_train(args, nproc=2, timeout=400))
    return ep2, tb_scalars(os.path.join(ep2, "tb"))


def test_ep1_checkpoint_resumes_at_ep2(base_run, ep2_resumed_run):
    """EP=1 -> EP=2 resharding: the next step's loss matches the EP=1 run."""
    _, _, base = base_run
    _, ep2 = ep2_resumed_run
    assert ep2["lm loss"][5] == pytest.approx(base["lm loss"][5], abs=1e-5)


def test_ep2_checkpoint_resumes_at_ep1(ep2_resumed_run, corpus, tmp_path):
    """EP=2 -> EP=1 resharding: resuming EP=2's step-6 checkpoint at EP=1 gives its step-7 loss."""
    ep2_dir, ep2 = ep2_resumed_run
    args = train_args(corpus, str(tmp_path), train_iters=ITERS,
                      extra=["--load", os.path.join(ep2_dir, "ckpt"), "--ckpt-step", "6",
                             "--no-load-optim", "--no-load-rng"])
    check(run_train(args))
    ep1 = tb_scalars(os.path.join(tmp_path, "tb"))
    assert ep1["lm loss"][7] == pytest.approx(ep2["lm loss"][7], abs=1e-5)


def test_standard_routing_baseline_trains_with_the_balanced_layout(corpus, tmp_path):
    """The recipe's standard twin (02b): no pools, and the EP-balanced layout.

    The EP-balanced layout: SharedExpertMLP, 7 routed + 1 padding expert.
    """
    balanced = ["--emo-num-shared-experts", "0", "--emo-num-padding-experts", "1",
                "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "64"]
    args = train_args(corpus, str(tmp_path), train_iters=4,
                      extra=["--emo-routing", "standard", *balanced])
    proc = check(run_train(args))
    scalars = tb_scalars(os.path.join(tmp_path, "tb"))
    assert "[EMO routing]" in proc.stdout
    # No pools: every document may use all 7 routed experts (the padding expert is not one).
    assert scalars["emo/pool_size_mean"][4] == 7.0
    assert scalars["emo/in_pool_fraction"][4] == 1.0
    assert scalars["lm loss"][4] < scalars["lm loss"][1]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--clip-grad", "1.0"], "--clip-grad 1.0"),
        (["--fp16"], "--fp16"),
        (["--bf16"], "--bf16"),
        (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine"),
        (["--emo-pool-size-min", "1"], "emo_pool_size_min (1)"),
        # Megatron's bare assert, after building the model (optimizer_param_scheduler.py:160).
        (["--lr-warmup-iters", "4"], "--lr-warmup-iters 4 gives 4 warm-up iterations"),
    ],
    ids=["clip-grad", "fp16", "bf16", "te", "pool-below-topk", "warmup-not-below-decay"],
)
def test_contradictory_flags_fail_at_start_up(corpus, tmp_path, change, named):
    proc = run_train(train_args(corpus, str(tmp_path), train_iters=4, extra=change), timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr, proc.stderr[-3000:]
    assert "iteration" not in proc.stdout.split("training ...")[-1]  # failed before training


def test_pp1_checkpoint_resumes_at_pp2(base_run, corpus, tmp_path):
    """PP=2 over 2 gloo ranks matches the PP=1 run.

    Both stages get the documents (same per-layer pool sizes as PP=1) and the next step's loss
    matches the PP=1 run.
    """
    out, _, base = base_run
    args = train_args(corpus, str(tmp_path), train_iters=5, extra=[
        "--pipeline-model-parallel-size", "2", "--load", os.path.join(out, "ckpt"),
        "--ckpt-step", "4", "--no-load-optim", "--no-load-rng",
    ])
    proc = check(run_train(args, nproc=2, timeout=400))
    pp2 = tb_scalars(os.path.join(tmp_path, "tb"))
    assert pp2["lm loss"][5] == pytest.approx(base["lm loss"][5], abs=1e-5)
    for layer in (1, 2):  # layer 1 lives on stage 0 (its own event file), layer 2 on stage 1
        tag = f"emo/pool_size_mean/layer_{layer}"
        assert pp2[tag][5] == base[tag][5]
        assert pp2[f"emo/in_pool_fraction/layer_{layer}"][5] == 1.0
    assert "[EMO routing stage 0]" in proc.stdout and "[EMO routing stage 1]" in proc.stdout


def test_hf_export_takes_special_ids_from_the_training_tokenizer(base_run, tmp_path):
    """``to-hf`` on an entry-point checkpoint takes eos/pad from its --tokenizer-* args.

    NullTokenizer: EOD = vocab - 1, no pad -> EOD; not EMO's published 100257/100277.
    """
    import json
    import subprocess
    import sys

    from train_runs import REPO_ROOT, VOCAB, clean_env

    out, _, _ = base_run
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "to-hf", os.path.join(out, "ckpt"),
         str(tmp_path / "hf")], cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == VOCAB - 1
    assert config["pad_token_id"] == VOCAB - 1
