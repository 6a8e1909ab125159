"""The ``random`` and ``easy-ep`` selection methods and calibration subsampling (no megatron).

* ``easy-ep`` scores equal a per-token Python loop over the MoE block's inputs (gate weight x
  expert-output norm x (1 - cos(x, x + MoE(x))), routed top-k tokens only), with padding in the
  batch excluded; a hand case: an expert whose output is zero scores exactly 0 and is dropped
  by ``easy-ep`` although ``global`` keeps it for its dominant gate row.
* ``random`` keeps the top of ``torch.rand`` from ``Generator().manual_seed(seed)`` per layer in
  order, ignores the examples, and depends on the seed.
* ``subsample_indices`` is the seeded ``randperm`` prefix, sorted; every method writes the same
  ``selection.json`` fields through the CLI.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/subsets/test_selection_methods.py -q``
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_emo.subsets import select_experts
from megatron_emo.subsets.scoring import easy_ep_scores
from megatron_emo.subsets.sources import load_hf_model, subsample_indices

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

E, S, K = 8, 1, 3  # tiny fixture: 8 experts incl. 1 shared, top-3 (2 routed + shared)


def _examples(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (int(torch.randint(3, 20, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_hf_model(tiny_hf_dir)


def _loop_easy_ep(model, examples):
    """Token by token, expert by expert: the EASY-EP sum of emo_spec.md 5.2 over the examples."""
    blocks = [layer.mlp for layer in model.model.layers]
    inputs: list[dict] = []
    handles = [b.register_forward_hook(
        lambda mod, inp, out, i=i: inputs[-1].__setitem__(i, inp[0][0].clone()))
        for i, b in enumerate(blocks)]
    with torch.no_grad():
        for ex in examples:  # one unpadded sequence at a time: the MoE inputs of its tokens
            inputs.append({})
            model(torch.tensor([ex]), use_cache=False)
    for h in handles:
        h.remove()
    totals = [torch.zeros(E - S, dtype=torch.float64) for _ in blocks]
    with torch.no_grad():
        for seq in inputs:
            for i, block in enumerate(blocks):
                for x in seq[i]:
                    moe_out, logits = block(x[None, None])
                    s = max(0.0, 1.0 - float(F.cosine_similarity(x, x + moe_out[0, 0], dim=0)))
                    probs = logits[0, :E - S].softmax(-1)
                    for e in probs.topk(K - S).indices.tolist():
                        norm = float(block.experts[e](x).norm())
                        totals[i][e] += float(probs[e]) * norm * s
    count = sum(len(e) for e in examples)
    return [t / count for t in totals]


def test_easy_ep_scores_match_token_loop(model):
    ex = _examples(n=4, seed=7)
    got, num_tokens = easy_ep_scores(model, ex, batch_size=4)  # one padded batch
    want = _loop_easy_ep(model, ex)
    assert num_tokens == sum(len(e) for e in ex)
    for layer in range(2):
        torch.testing.assert_close(got[layer], want[layer], atol=1e-6, rtol=1e-5)
        assert (got[layer] > 0).sum() >= K - S  # the routed experts that fired score > 0
    sel = select_experts(model, ex, 4, method="easy-ep")
    for layer in range(2):
        top = sorted(want[layer].argsort(descending=True)[:3].tolist())
        assert sel.experts_kept_per_layer[layer] == top + [E - 1]


def test_easy_ep_drops_a_silent_expert_that_global_keeps(model):
    """EASY-EP drops an expert that outputs zeros; global selection keeps it.

    Expert 2 of layer 0 gets a dominant gate row but outputs zeros: global keeps it (mean
    probability), EASY-EP scores it 0 (its output norm is 0) and keeps the others.
    """
    m = copy.deepcopy(model)
    block = m.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight[2] = 5.0 * block.gate.weight[:E - S].mean(0) + 2.0
        block.experts[2].down_proj.weight.zero_()
    ex = _examples(n=4, seed=8)
    scores, _ = easy_ep_scores(m, ex)
    assert float(scores[0][2]) == 0.0
    glob = select_experts(m, ex, 4, method="global")
    easy = select_experts(m, ex, 4, method="easy-ep")
    assert 2 in glob.experts_kept_per_layer[0]
    assert 2 not in easy.experts_kept_per_layer[0]
    assert easy.experts_kept_per_layer[0][-1] == E - 1


def test_random_is_the_seeded_generator_and_ignores_examples(model):
    sel = select_experts(model, _examples(seed=1), 4, method="random", seed=11)
    gen = torch.Generator().manual_seed(11)
    for layer in range(2):
        want = sorted(torch.rand(E - S, generator=gen, dtype=torch.float64)
                      .argsort(descending=True)[:3].tolist()) + [E - 1]
        assert sel.experts_kept_per_layer[layer] == want
    assert sel.extra["seed"] == 11 and sel.method == "random"
    again = select_experts(model, [], 4, method="random", seed=11)
    assert again.experts_kept_per_layer == sel.experts_kept_per_layer
    others = {str(select_experts(model, [], 4, method="random", seed=s).experts_kept_per_layer)
              for s in range(6)}
    assert len(others) > 1
    with pytest.raises(ValueError, match="method 'easy-ep' needs at least one example"):
        select_experts(model, [], 4, method="easy-ep")


def test_subsample_indices():
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert subsample_indices(10, 4, 3) == sorted(perm[:4].tolist())
    assert subsample_indices(10, 4, 3) != subsample_indices(10, 4, 4)
    assert subsample_indices(5, None, 0) == subsample_indices(5, 9, 0) == list(range(5))
    with pytest.raises(ValueError, match="num_examples must be at least 1, got 0"):
        subsample_indices(5, 0, 0)


@pytest.mark.parametrize("method", ["global", "greedy-layerwise", "easy-ep", "random"])
def test_cli_methods_write_the_same_selection_json(tmp_path, tiny_hf_dir, method):
    import select_experts as cli

    ex = tmp_path / "ex.jsonl"
    records = _examples(n=6, seed=2)
    ex.write_text("".join(json.dumps({"tokens": r}) + "\n" for r in records))
    out = tmp_path / method
    cli.main([tiny_hf_dir, str(ex), "--keep", "4", "--output", str(out), "--method", method,
              "--num-examples", "3", "--seed", "5", "--no-megatron"])
    sel = json.load(open(out / "selection.json"))
    kept_rows = subsample_indices(6, 3, 5)
    assert sel["method"] == method and sel["num_examples"] == 3
    assert sel["num_tokens"] == sum(len(records[i]) for i in kept_rows)
    assert sel["extra"]["num_examples_requested"] == 3 and sel["extra"]["subsample_seed"] == 5
    assert all(len(k) == 4 and k[-1] == E - 1 for k in sel["experts_kept_per_layer"])
    assert all(len(s) == E - S for s in sel["scores_per_layer"])
    reference = json.load(open(_reference_selection(tmp_path, tiny_hf_dir, ex)))
    assert set(sel) == set(reference) and set(sel["extra"]) - {"seed"} == set(reference["extra"])
    meta = json.load(open(out / "hf" / "pruning_metadata.json"))
    assert meta["method"] == method and meta["seed"] == 5


def _reference_selection(tmp_path, tiny_hf_dir, ex) -> str:
    """selection.json of the default method on the same inputs (the schema every method shares)."""
    import select_experts as cli

    out = tmp_path / "reference"
    if not (out / "selection.json").exists():
        cli.main([tiny_hf_dir, str(ex), "--keep", "4", "--output", str(out), "--no-megatron"])
    return str(out / "selection.json")


def test_cli_refuses_bad_calibration_arguments(tmp_path, tiny_hf_dir):
    import select_experts as cli

    with pytest.raises(ValueError, match="exactly one calibration source"):
        cli.main([tiny_hf_dir, "--keep", "4", "--output", str(tmp_path / "o")])
    ex = tmp_path / "ex.jsonl"
    ex.write_text(json.dumps({"tokens": [3, 4, 5]}) + "\n")
    with pytest.raises(ValueError, match="exactly one calibration source"):
        cli.main([tiny_hf_dir, str(ex), "--task", "emo_mc_math", "--keep", "4", "--output",
                  str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--num-examples must be at least 1, got 0"):
        cli.main([tiny_hf_dir, str(ex), "--keep", "4", "--num-examples", "0", "--output",
                  str(tmp_path / "o")])
