"""``python -m megatron_emo.train`` on CUDA (marker ``gpu``).

A few bf16 steps of a tiny EMO model through ``pretrain()`` without ``--cpu`` (local spec; TE spec
too when TE imports), the wheel's start-up fixes included; loss decreases and the routing stays
inside the pools.

Run on a GPU machine: ``python -m pytest -m gpu tests/gpu/test_gpu_train.py -q``
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))

from train_runs import (  # noqa: E402
    TINY_EMO_ARGS,
    TINY_MODEL_ARGS,
    TINY_MOE_ARGS,
    VOCAB,
    check,
    make_corpus,
    run_train,
    tb_scalars,
)

pytestmark = pytest.mark.gpu


def _te_available() -> bool:
    from megatron_emo.mcore.specs import transformer_engine_importable

    return transformer_engine_importable()


@pytest.mark.parametrize(
    "impl",
    [
        "local",
        pytest.param(
            "transformer_engine",
            marks=pytest.mark.skipif(not _te_available(), reason="no TE"),
        ),
    ],
)
@pytest.mark.parametrize("routing", ["emo", "standard"])
def test_train_steps_on_cuda(tmp_path, impl, routing):
    corpus = make_corpus(str(tmp_path / "docs"))
    impl_args = (
        ["--transformer-impl", "local", "--attention-backend", "local", "--spec", "local",
         "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
         "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm"]
        if impl == "local"
        else ["--transformer-impl", "transformer_engine", "--moe-grouped-gemm"]
    )
    args = [
        *impl_args, *TINY_MODEL_ARGS, *TINY_MOE_ARGS, *TINY_EMO_ARGS, "--emo-routing", routing,
        "--bf16", "--clip-grad", "1.0", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "12", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "2", "--seed", "1234", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(VOCAB), "--data-path", corpus, "--split", "98,1,1",
        "--dataloader-inter-document-masking", "--log-interval", "1", "--eval-interval", "1000",
        "--eval-iters", "1", "--tensorboard-dir", str(tmp_path / "tb"),
        "--data-cache-path", str(tmp_path / "cache"), "--save", str(tmp_path / "ckpt"),
        "--save-interval", "12",
    ]
    check(run_train(args, timeout=400))
    scalars = tb_scalars(str(tmp_path / "tb"))
    losses = [scalars["lm loss"][s] for s in range(1, 13)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    assert all(scalars["emo/in_pool_fraction"][s] == 1.0 for s in range(1, 13))
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
