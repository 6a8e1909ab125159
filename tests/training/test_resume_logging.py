"""Logged losses of a resumed run, and a ``--cpu`` run without known messages.

Every logged step of a resumed run equals the uninterrupted run, on stdout and in TensorBoard; and a
``--cpu`` run prints none of ``megatron_emo/quiet.py``'s known messages.

Megatron 0.19.2 keeps its stdout loss sums after a run's first iteration even when that iteration
ends a ``--log-interval`` window, so the next printed ``lm loss`` / ``load_balancing_loss`` /
``z_loss`` averaged one window too many (``megatron_emo/training/compat.py``). Two tiny runs
(about 40 s on 2 cores): 6 iterations at ``--log-interval 1`` saving at step 3, and a resume from
step 3 at ``--log-interval 2`` (its first iteration, 4, ends a window).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_resume_logging.py -q``
"""

from __future__ import annotations

import os
import re

import pytest

from train_runs import check, make_corpus, run_train, tb_scalars, train_args

ITERS = 6
LOSSES = ("lm loss", "load_balancing_loss", "z_loss")
_LOG_LINE = re.compile(r"iteration +(\d+)/ *\d+ \|(.*)")
_VALUE = re.compile(r"(lm loss|load_balancing_loss|z_loss): ([-+.0-9E]+) \|")


def _stdout_losses(stdout: str) -> dict[int, dict[str, float]]:
    """``{iteration: {loss name: value}}`` from Megatron's training log lines."""
    out = {}
    for line in stdout.splitlines():
        m = _LOG_LINE.search(line)
        if m:
            out[int(m.group(1))] = {k: float(v) for k, v in _VALUE.findall(m.group(2))}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = make_corpus(str(tmp_path_factory.mktemp("data") / "docs"))
    base = str(tmp_path_factory.mktemp("uninterrupted"))
    ckpt = os.path.join(base, "ckpt")
    base_proc = check(run_train(train_args(data, base, train_iters=ITERS, extra=[
        "--save", ckpt, "--save-interval", "3"])))  # --log-interval 1 (train_args)
    resumed = str(tmp_path_factory.mktemp("resumed"))
    resumed_proc = check(run_train(train_args(data, resumed, train_iters=ITERS, extra=[
        "--load", ckpt, "--ckpt-step", "3", "--log-interval", "2"])))
    return {
        "base": (base_proc, tb_scalars(os.path.join(base, "tb"))),
        "resumed": (resumed_proc, tb_scalars(os.path.join(resumed, "tb"))),
    }


def test_log_interval_1_prints_each_steps_own_losses(runs):
    """At --log-interval 1 every printed value is that step's (TensorBoard) value.

    Before the fix step 2 printed the mean of steps 1 and 2.
    """
    proc, tb = runs["base"]
    printed = _stdout_losses(proc.stdout)
    assert sorted(printed) == list(range(1, ITERS + 1))
    for step, values in printed.items():
        assert set(values) == set(LOSSES), values
        for name in LOSSES:
            assert values[name] == pytest.approx(tb[name][step], rel=2e-6), (step, name)


def test_resumed_run_logs_every_step_like_the_uninterrupted_run(runs):
    """Resume from step 3 at --log-interval 2 logs what an uninterrupted run logs.

    Step 4 (first, ends a window) prints step 4's losses and step 6 the mean of steps 5 and 6, as an
    uninterrupted run does (before the fix: the mean of 4, 5 and 6). TensorBoard gets exactly the
    uninterrupted run's values.
    """
    base_proc, base_tb = runs["base"]
    proc, tb = runs["resumed"]
    base_printed = _stdout_losses(base_proc.stdout)
    printed = _stdout_losses(proc.stdout)
    assert sorted(printed) == [4, 6]
    for name in LOSSES:
        assert printed[4][name] == base_printed[4][name], name
        window = (base_tb[name][5] + base_tb[name][6]) / 2
        assert printed[6][name] == pytest.approx(window, rel=2e-6), name
    # Every scalar of the resumed run, at every step it logged, as in the uninterrupted run.
    compared = 0
    for tag, values in tb.items():
        if tag.endswith(" vs samples") or "validation" in tag:
            continue  # x axis = samples; validation runs at the end of each run
        for step, value in values.items():
            assert value == base_tb[tag][step], (tag, step)
            compared += 1
    assert {"lm loss", "load_balancing_loss", "z_loss", "grad-norm",
            "emo/pool_size_mean/layer_2"} <= set(tb)
    assert sorted(tb["lm loss"]) == [4, 5, 6] and compared > 40


def test_cpu_run_prints_no_known_irrelevant_message(runs):
    """``--cpu`` output has none of the CPU-scope messages of megatron_emo/quiet.py.

    Without the filter it printed all nine; the losses, routing metrics and validation are still
    printed.
    """
    from megatron_emo.quiet import KNOWN_MESSAGES

    proc, _ = runs["base"]
    output = proc.stdout + proc.stderr
    shown = [m.source for m in KNOWN_MESSAGES if m.scope == "cpu" and re.search(m.pattern, output)]
    assert shown == []
    assert re.search(r"iteration +6/ +6 \|.* lm loss: ", proc.stdout)
    assert re.search(r"\[EMO routing\] iteration +6 \| pool_size_mean", proc.stdout)
    assert "validation loss at iteration 6" in proc.stdout
    assert re.search(r"saved checkpoint from iteration +6 ", proc.stdout)
