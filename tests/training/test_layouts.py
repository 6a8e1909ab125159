"""Every parallel layout through ``python -m megatron_emo.train --cpu``, against one process.

Each layout (gloo, 1-4 processes) is compared with the single-process run: TP=2 + sequence
parallelism from the same seed, DP=2 with the distributed optimizer, resume of a (TP=1, EP=1, DP=2)
distributed-optimizer checkpoint at EP=2, TP=2 + SP, DP=1 and EP=2 x TP=2 with the optimizer state,
and virtual pipeline stages reporting every chunk's routing metrics.

Every step is one micro-batch per rank (micro-batch 4 at DP=1, 2 at DP=2): the load-balancing
loss is taken per micro-batch over its TP x DP x CP ranks, so the layouts balance the same token
sets and their losses agree to fp32 rounding. ``emo/pool_size_mean`` is the mean over the DP
ranks of each rank's mean over its documents, so it is compared between runs of the same DP
size (the per-document pool sizes are the same in every layout). Run:
``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_layouts.py -q``
"""

from __future__ import annotations

import math
import os

import pytest

from train_runs import check, make_corpus, run_train, tb_scalars, train_args

ITERS = 5
SAVE_AT = 3
DP1 = ["--micro-batch-size", "4"]  # global batch 4: one micro-batch per step at DP = 1
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
EP2 = ["--expert-model-parallel-size", "2"]
DIST_OPT = [
    "--use-distributed-optimizer", "--ckpt-format", "torch_dist",
    "--dist-ckpt-optim-fully-reshardable",
]
LAYERS = (1, 2)


def _series(scalars, tag, steps):
    return [scalars[tag][s] for s in steps]


def _assert_close(got, want, rel, what):
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert math.isclose(g, w, rel_tol=rel), f"{what}: {got} vs {want} (index {step})"


def _print_table(title, reference, runs, steps, reference_name="single process (reference)"):
    """The loss table of the report: each layout against the single-process run."""
    print(f"\n{title}\n{'layout':<28}" + "".join(f"{f'step {s}':>12}" for s in steps))
    for name, scalars in [(reference_name, reference), *runs]:
        print(f"{name:<28}" + "".join(f"{scalars['lm loss'][s]:>12.6f}" for s in steps))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("data") / "docs"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The single-process run: TP = EP = DP = 1, Megatron's non-distributed optimizer."""
    out = str(tmp_path_factory.mktemp("reference"))
    check(run_train(train_args(corpus, out, train_iters=ITERS, extra=DP1)))
    return tb_scalars(os.path.join(out, "tb"))


@pytest.fixture(scope="module")
def dp2_dist_opt(corpus, tmp_path_factory):
    """(TP=1, EP=1, DP=2) with the distributed optimizer.

    Saves a fully reshardable torch_dist checkpoint at step SAVE_AT.
    """
    out = str(tmp_path_factory.mktemp("dp2"))
    extra = [*DIST_OPT, "--save", os.path.join(out, "ckpt"), "--save-interval", str(SAVE_AT)]
    check(run_train(train_args(corpus, out, train_iters=ITERS, extra=extra), nproc=2, timeout=600))
    return os.path.join(out, "ckpt"), tb_scalars(os.path.join(out, "tb"))


def test_dp2_distributed_optimizer_equals_dp1(reference, dp2_dist_opt):
    """DP=2 + distributed optimizer (gloo) trains like DP=1 with the plain optimizer."""
    _, dp2 = dp2_dist_opt
    steps = range(1, SAVE_AT + 1)
    _print_table("DP=2 + distributed optimizer vs DP=1", reference, [("DP=2 dist-opt", dp2)], steps)
    losses = _series(dp2, "lm loss", steps)
    _assert_close(losses, _series(reference, "lm loss", steps), 1e-5, "lm loss")
    for layer in LAYERS:
        assert _series(dp2, f"emo/in_pool_fraction/layer_{layer}", steps) == [1.0] * 3


def test_tp2_sequence_parallel_equals_tp1(reference, corpus, tmp_path):
    """TP=2 + SP from the same seed matches TP=1.

    The first 3 losses equal TP=1, per-layer pool sizes are identical, and every routed token stays
    in its document's pool (documents are cut by the sequence shards; their pools come from the
    whole document).
    """
    args = train_args(corpus, str(tmp_path), train_iters=3, extra=[*DP1, *TP2_SP])
    check(run_train(args, nproc=2, timeout=600))
    tp2 = tb_scalars(os.path.join(tmp_path, "tb"))
    steps = range(1, 4)
    _print_table("TP=2 + SP vs TP=1 (from scratch)", reference, [("TP=2 + SP", tp2)], steps)
    losses = _series(tp2, "lm loss", steps)
    _assert_close(losses, _series(reference, "lm loss", steps), 1e-3, "lm loss")
    for layer in LAYERS:
        tag = f"emo/pool_size_mean/layer_{layer}"
        assert _series(tp2, tag, steps) == _series(reference, tag, steps), tag
        assert _series(tp2, f"emo/in_pool_fraction/layer_{layer}", steps) == [1.0] * 3


RESUME_LAYOUTS = {  # name: (processes, DP size, flags)
    "ep2": (2, 2, EP2),  # DP = 2 for the dense part, experts split over 2 ranks
    "tp2-sp": (2, 1, [*DP1, *TP2_SP]),
    "dp1": (1, 1, DP1),
    "ep2-tp2-sp": (4, 2, [*EP2, *TP2_SP]),  # 4 ranks: DP = 2, expert TP = 2
}


def _resume(corpus, ckpt, out, layout, *, step=SAVE_AT, extra=()):
    nproc, _, layout_args = RESUME_LAYOUTS[layout]
    extra = [*layout_args, *DIST_OPT, "--load", ckpt, "--ckpt-step", str(step), *extra]
    proc = check(run_train(train_args(corpus, str(out), train_iters=ITERS, extra=extra),
                           nproc=nproc, timeout=600))
    assert f"successfully loaded checkpoint from {ckpt}" in proc.stdout
    return tb_scalars(os.path.join(out, "tb"))


@pytest.fixture(scope="module")
def ep2_resumed(corpus, dp2_dist_opt, tmp_path_factory):
    """The DP=2 checkpoint resumed at EP=2; saves its own checkpoint at step SAVE_AT + 1."""
    out = tmp_path_factory.mktemp("ep2")
    ckpt = str(out / "ckpt")
    extra = ["--save", ckpt, "--save-interval", str(SAVE_AT + 1)]
    return ckpt, _resume(corpus, dp2_dist_opt[0], out, "ep2", extra=extra)


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS), ids=list(RESUME_LAYOUTS))
def test_resume_in_another_layout_with_optimizer_state(
    reference, dp2_dist_opt, corpus, tmp_path, request, layout
):
    """The (TP=1, EP=1, DP=2) checkpoint resumes in another layout with the optimizer state.

    With the distributed optimizer's state, the next two losses equal the uninterrupted run's (the
    second depends on the Adam moments and step; without them it is 4.670 instead of 4.592) and the
    pools are the same. EP=2 and EP=2 x TP=2 are also the issue's 'train and match the
    single-process run'.
    """
    ckpt, uninterrupted = dp2_dist_opt
    if layout == "ep2":
        _, resumed = request.getfixturevalue("ep2_resumed")
    else:
        resumed = _resume(corpus, ckpt, tmp_path, layout)
    steps = range(SAVE_AT + 1, ITERS + 1)
    _print_table(f"resumed at {layout} (saved at DP=2)", reference,
                 [("uninterrupted DP=2", uninterrupted), (layout, resumed)], steps)
    losses = _series(resumed, "lm loss", steps)
    _assert_close(losses, _series(uninterrupted, "lm loss", steps), 1e-4, "vs uninterrupted")
    _assert_close(losses, _series(reference, "lm loss", steps), 1e-4, "vs single process")
    same_dp = uninterrupted if RESUME_LAYOUTS[layout][1] == 2 else reference
    for layer in LAYERS:
        # Same pools; the mean over 4 ranks (EP=2 x TP=2) may round its last bit differently.
        tag = f"emo/pool_size_mean/layer_{layer}"
        want = _series(same_dp, tag, steps)
        assert _series(resumed, tag, steps) == pytest.approx(want, rel=1e-6, abs=0), tag
        assert _series(resumed, f"emo/in_pool_fraction/layer_{layer}", steps) == [1.0, 1.0]


def test_ep2_checkpoint_resumes_at_ep1_with_optimizer_state(
    reference, ep2_resumed, corpus, tmp_path
):
    """The reverse direction: an EP=2 checkpoint resumes at EP=1, DP=1 with its state.

    The EP=2 checkpoint has the distributed optimizer's two optimizers (a dense and an expert one);
    EP=1, DP=1 has one optimizer.
    """
    ckpt, _ = ep2_resumed
    resumed = _resume(corpus, ckpt, tmp_path, "dp1", step=SAVE_AT + 1)
    _print_table("resumed at dp1 (saved at EP=2)", reference, [("dp1", resumed)], [ITERS])
    _assert_close([resumed["lm loss"][ITERS]], [reference["lm loss"][ITERS]], 1e-4, "lm loss")


def test_virtual_pipeline_reports_every_chunk(corpus, tmp_path):
    """PP=2 with 2 virtual stages reports every chunk's routing metrics at every step.

    2 virtual stages of 1 layer (stage 0 holds layers 1 and 3): every layer's routing metrics at
    every step, with the pool sizes of the PP=1 run (pool sizes depend only on seed, iteration,
    layer and document). Before the fix only the chunk of the step's first forward was reported, the
    other chunk's sums piled up until the end of training.
    """
    four = ["--num-layers", "4"]  # micro-batch 2: 2 micro-batches, as the schedule needs M >= PP
    check(run_train(train_args(corpus, str(tmp_path / "pp1"), train_iters=3, extra=four)))
    pp1 = tb_scalars(str(tmp_path / "pp1" / "tb"))
    vpp_args = [*four, "--pipeline-model-parallel-size", "2",
                "--num-layers-per-virtual-pipeline-stage", "1"]
    args = train_args(corpus, str(tmp_path / "vpp"), train_iters=3, extra=vpp_args)
    proc = check(run_train(args, nproc=2, timeout=600))
    vpp = tb_scalars(str(tmp_path / "vpp" / "tb"))
    assert "Number of virtual stages per pipeline stage: 2" in proc.stdout
    steps = range(1, 4)
    assert all(math.isfinite(x) for x in _series(vpp, "lm loss", steps))
    for layer in (1, 2, 3, 4):
        tag = f"emo/pool_size_mean/layer_{layer}"
        assert sorted(vpp.get(tag, {})) == list(steps), f"{tag}: {vpp.get(tag)}"
        assert _series(vpp, tag, steps) == _series(pp1, tag, steps), tag
        assert _series(vpp, f"emo/in_pool_fraction/layer_{layer}", steps) == [1.0] * 3
        experts = _series(vpp, f"emo/experts_per_document/layer_{layer}", steps)
        assert all(1.0 <= x <= 7.0 for x in experts), experts



BALANCED = [  # the recipe's EP-balanced layout: SharedExpertMLP, 7 routed + 1 padding expert
    "--emo-num-shared-experts", "0", "--emo-num-padding-experts", "1",
    "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "64",
]


def test_balanced_layout_resumes_at_ep2_tp2_sp_with_optimizer_state(corpus, tmp_path):
    """The recipe's layout resumes at EP=2 x TP=2 + SP with the uninterrupted run's losses.

    The layout: Megatron's SharedExpertMLP, split by TP and fed the sequence-parallel shards, and a
    never-routed padding expert. A (TP=1, EP=1, DP=2) distributed-optimizer run saved at step 2 and
    resumed at EP=2 x TP=2 + SP (4 ranks) gives the uninterrupted run's next two losses, every token
    in its pool. (From scratch the layouts cannot agree: Megatron seeds the expert weights per EP
    rank.)
    """
    saved = tmp_path / "dp2"
    ckpt = str(saved / "ckpt")
    extra = [*BALANCED, *DIST_OPT, "--save", ckpt, "--save-interval", "2"]
    check(run_train(train_args(corpus, str(saved), train_iters=4, extra=extra), nproc=2,
                    timeout=600))
    uninterrupted = tb_scalars(str(saved / "tb"))
    out = tmp_path / "big"
    extra = [*EP2, *TP2_SP, *BALANCED, *DIST_OPT, "--load", ckpt, "--ckpt-step", "2"]
    proc = check(run_train(train_args(corpus, str(out), train_iters=4, extra=extra), nproc=4,
                           timeout=600))
    assert f"successfully loaded checkpoint from {ckpt}" in proc.stdout
    resumed = tb_scalars(str(out / "tb"))
    steps = range(3, 5)
    _print_table("balanced layout: saved at DP=2, resumed at EP=2 x TP=2 + SP", uninterrupted,
                 [("EP=2 x TP=2 + SP", resumed)], steps, "uninterrupted DP=2")
    _assert_close(_series(resumed, "lm loss", steps), _series(uninterrupted, "lm loss", steps),
                  1e-4, "lm loss")
    for layer in LAYERS:
        assert _series(resumed, f"emo/in_pool_fraction/layer_{layer}", steps) == [1.0] * 2
