"""Pool-size draws (``sample_pool_sizes``, ``eval_pool_sizes``).

Determinism, range, key dependence, independence from key order and batching (what makes any
sharding route identically), uniformity.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_pool_sizes.py -q``
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_emo.routing import eval_pool_sizes, sample_pool_sizes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = dict(seed=1234, iteration=17, layer=3, min_size=8, max_size=128)
KEYS = torch.arange(0, 4096, dtype=torch.int64) * 7919 + 11


def test_deterministic_within_process() -> None:
    a = sample_pool_sizes(KEYS, **ARGS)
    b = sample_pool_sizes(KEYS.clone(), **ARGS)
    assert a.dtype == torch.int64
    assert a.shape == KEYS.shape
    assert torch.equal(a, b)


def test_deterministic_in_fresh_process() -> None:
    code = (
        "import torch\n"
        "from megatron_emo.routing import sample_pool_sizes\n"
        "keys = torch.arange(0, 4096, dtype=torch.int64) * 7919 + 11\n"
        f"out = sample_pool_sizes(keys, **{ARGS!r})\n"
        "print(','.join(map(str, out.tolist())))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    fresh = [int(v) for v in res.stdout.strip().split(",")]
    assert fresh == sample_pool_sizes(KEYS, **ARGS).tolist()


RANGES = [(8, 128), (1, 1), (5, 6), (32, 32), (1, 200)]


@pytest.mark.parametrize("bounds", RANGES, ids=[f"{lo}-{hi}" for lo, hi in RANGES])
def test_values_within_inclusive_bounds(bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    out = sample_pool_sizes(KEYS, seed=0, iteration=0, layer=0, min_size=lo, max_size=hi)
    assert int(out.min()) >= lo and int(out.max()) <= hi
    if hi - lo < 10:
        # Small ranges: both ends are reached over 4096 keys.
        assert set(out.tolist()) == set(range(lo, hi + 1))


FIELDS = [
    ("seed", 1235),
    ("seed", 1234 + 2**32),  # the high word of a 64-bit seed counts too
    ("iteration", 18),
    ("iteration", 17 + 2**32),
    ("layer", 4),
]


@pytest.mark.parametrize("field,value", FIELDS, ids=[f"{f}={v}" for f, v in FIELDS])
def test_depends_on_each_counter(field: str, value: int) -> None:
    base = sample_pool_sizes(KEYS, **ARGS)
    other = sample_pool_sizes(KEYS, **{**ARGS, field: value})
    # 121 values: about 1/121 of the keys agree by chance.
    assert (base != other).float().mean() > 0.9


def test_depends_on_key_including_high_word() -> None:
    base = sample_pool_sizes(KEYS, **ARGS)
    assert (base != sample_pool_sizes(KEYS + 1, **ARGS)).float().mean() > 0.9
    assert (base != sample_pool_sizes(KEYS + 2**32, **ARGS)).float().mean() > 0.9


def test_equal_keys_equal_sizes() -> None:
    keys = torch.tensor([5, 99, 5, 5, 99, 123456789012], dtype=torch.int64)
    out = sample_pool_sizes(keys, **ARGS)
    assert out[0] == out[2] == out[3]
    assert out[1] == out[4]


def test_independent_of_key_order_and_batching() -> None:
    keys = torch.tensor([3, 1_000_003, 2**40 + 9, 77, 0], dtype=torch.int64)
    together = sample_pool_sizes(keys, **ARGS)
    separately = torch.cat([sample_pool_sizes(keys[i : i + 1], **ARGS) for i in range(len(keys))])
    assert torch.equal(together, separately)
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert torch.equal(sample_pool_sizes(keys[perm], **ARGS), together[perm])
    # A different "sharding": the keys split over two calls.
    halves = torch.cat([sample_pool_sizes(keys[:2], **ARGS), sample_pool_sizes(keys[2:], **ARGS)])
    assert torch.equal(halves, together)


def test_uniform_distribution_chi_square() -> None:
    lo, hi = 8, 128
    num_values = hi - lo + 1  # 121 bins
    keys = torch.arange(num_values * 1000, dtype=torch.int64)  # deterministic: cannot flake
    out = sample_pool_sizes(keys, seed=42, iteration=1000, layer=5, min_size=lo, max_size=hi)
    counts = torch.bincount(out - lo, minlength=num_values).double()
    assert counts.numel() == num_values and bool((counts > 0).all())
    expected = keys.numel() / num_values
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 120 degrees of freedom: mean 120, sd sqrt(240) = 15.5. By the Wilson-Hilferty approximation
    # the upper 1e-6 quantile is 120 * (1 - 2/1080 + 4.75 * sqrt(2/1080))**3 = 208.7, so a
    # uniform hash exceeds 210 with probability < 1e-6, while a visibly biased one (for example
    # a 5% excess on a tenth of the bins) lands far above it.
    assert chi2 < 210.0, f"chi-square {chi2:.1f} over 120 dof"


BAD_ARGS = [
    dict(min_size=0, max_size=4),
    dict(min_size=9, max_size=8),
    dict(seed=-1),
    dict(iteration=-1),
    dict(layer=-1),
]


@pytest.mark.parametrize(
    "bad", BAD_ARGS, ids=[",".join(f"{k}={v}" for k, v in b.items()) for b in BAD_ARGS]
)
def test_rejects_bad_arguments(bad: dict) -> None:
    with pytest.raises(ValueError):
        sample_pool_sizes(KEYS[:4], **{**ARGS, **bad})


def test_eval_pool_sizes() -> None:
    out = eval_pool_sizes(5, size=32)
    assert out.dtype == torch.int64
    assert out.tolist() == [32] * 5
