"""Expert selection and pruning on a tiny random EMO HF model (no megatron).

* The kept experts are the top mean-probability routed experts computed independently from the
  model's returned gate logits (split softmax, shared expert always kept); ties -> lower index.
* Greedy-layerwise scores layer 1 on the model with layer 0 pruned; greedy == global at keep_k = E.
* A pruned HF directory (uniform and per-layer counts, keep_k below top-k) loads with
  ``AutoModelForCausalLM`` and equals the full model with the non-kept gate logits masked.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/subsets/test_selection.py -q``
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from megatron_emo.subsets import mask_experts, prune_hf_dir, prune_hf_model, select_experts
from megatron_emo.subsets.selection import top_experts
from megatron_emo.subsets.sources import load_hf_model

E, S = 8, 1


def _examples(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (int(torch.randint(3, 20, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(n)]


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def _hand_scores(model, examples):
    """Mean split-softmax routed probability per layer from the model's returned gate logits."""
    sums, count = None, 0
    with torch.no_grad():
        for ex in examples:
            out = model(torch.tensor([ex]), output_router_logits=True, use_cache=False)
            probs = [lg[:, : lg.shape[1] - S].float().softmax(-1).sum(0) for lg in
                     out.router_logits]
            sums = probs if sums is None else [a + b for a, b in zip(sums, probs, strict=True)]
            count += len(ex)
    return [s / count for s in sums]


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_hf_model(tiny_hf_dir)


def test_global_keeps_top_mean_probability_experts(model):
    ex = _examples()
    sel = select_experts(model, ex, 4, method="global")
    hand = _hand_scores(model, ex)
    for layer in range(2):
        torch.testing.assert_close(_f64(sel.scores_per_layer[layer]), hand[layer].double(),
                                   atol=1e-6, rtol=0)
        want = sorted(hand[layer].argsort(descending=True)[:3].tolist()) + [E - 1]
        assert sel.experts_kept_per_layer[layer] == want
    assert sel.num_tokens == sum(len(e) for e in ex) and sel.num_examples == 5
    assert sel.keep_k == 4


def test_greedy_scores_layer_on_pruned_prefix(model):
    ex = _examples(seed=1)
    greedy = select_experts(model, ex, 3, method="greedy-layerwise", batch_size=2)
    glob = select_experts(model, ex, 3, method="global")
    assert greedy.experts_kept_per_layer[0] == glob.experts_kept_per_layer[0]
    assert greedy.experts_kept_per_layer[0][-1] == E - 1
    prefix = prune_hf_model(copy.deepcopy(model), [greedy.experts_kept_per_layer[0],
                                                   list(range(E))])
    hand = _hand_scores(prefix, ex)
    torch.testing.assert_close(_f64(greedy.scores_per_layer[1]), hand[1].double(), atol=1e-6,
                               rtol=0)
    want = sorted(hand[1].argsort(descending=True)[:2].tolist()) + [E - 1]
    assert greedy.experts_kept_per_layer[1] == want


def test_greedy_equals_global_when_keeping_all(model):
    ex = _examples(seed=2)
    greedy = select_experts(model, ex, E, method="greedy-layerwise")
    glob = select_experts(model, ex, E, method="global")
    assert greedy.experts_kept_per_layer == glob.experts_kept_per_layer == [list(range(E))] * 2
    torch.testing.assert_close(torch.tensor(greedy.scores_per_layer),
                               torch.tensor(glob.scores_per_layer), atol=1e-6, rtol=0)


def test_ties_go_to_lower_index():
    scores = torch.tensor([0.1, 0.3, 0.3, 0.05, 0.3])
    assert top_experts(scores, 2) == [1, 2]
    assert top_experts(scores, 3) == [1, 2, 4]
    assert top_experts(torch.zeros(6), 3) == [0, 1, 2]


def test_per_layer_keep_lists(model):
    sel = select_experts(model, _examples(seed=3), keep_per_layer=[3, 6], method="global")
    assert [len(k) for k in sel.experts_kept_per_layer] == [3, 6]
    assert sel.keep_k is None and sel.keep_per_layer == [3, 6]
    assert all(k[-1] == E - 1 for k in sel.experts_kept_per_layer)


@pytest.mark.parametrize("keeps", [[4, 4], [2, 2], [3, 6]],
                         ids=["keep4", "below_topk", "per_layer"])
def test_pruned_dir_equals_masked_full_model(tmp_path, tiny_hf_dir, model, keeps):
    from transformers import AutoModelForCausalLM

    sel = select_experts(model, _examples(seed=4), keep_per_layer=keeps, method="global")
    out = str(tmp_path / "hf")
    cfg = prune_hf_dir(tiny_hf_dir, out, sel.experts_kept_per_layer, metadata={"method": "global"})
    assert cfg["num_experts"] == max(keeps)
    assert cfg["num_experts_per_layer"] == (keeps if keeps[0] != keeps[1] else None)
    assert cfg["num_experts_per_tok"] == min(3, max(keeps))
    meta = json.load(open(os.path.join(out, "pruning_metadata.json")))
    assert meta["experts_kept_per_layer"] == sel.experts_kept_per_layer
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert [len(layer.mlp.experts) for layer in pruned.model.layers] == keeps
    tokens = torch.randint(2, 128, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), mask_experts(model, sel.experts_kept_per_layer):
        masked = model(tokens).logits
    with torch.no_grad():
        got = pruned(tokens).logits
        full = model(tokens).logits
        in_memory = prune_hf_model(copy.deepcopy(model), sel.experts_kept_per_layer)(tokens).logits
    assert (got - masked).abs().max() <= 1e-5
    assert (in_memory - masked).abs().max() <= 1e-5
    assert (full - masked).abs().max() > 1e-3  # the subset does change the model


def test_repruning_records_original_indices(tmp_path, tiny_hf_dir):
    first = [[0, 2, 3, 5, 7], [1, 2, 4, 6, 7]]
    prune_hf_dir(tiny_hf_dir, str(tmp_path / "a"), first)
    prune_hf_dir(str(tmp_path / "a"), str(tmp_path / "b"), [[1, 3, 4], [0, 2, 4]])
    meta = json.load(open(tmp_path / "b" / "pruning_metadata.json"))
    assert meta["experts_kept_per_layer"] == [[2, 5, 7], [1, 4, 7]]
    assert meta["experts_kept_per_layer_of_source"] == [[1, 3, 4], [0, 2, 4]]
    assert meta["num_experts_per_layer_original"] == [8, 8]
    full, twice = load_hf_model(tiny_hf_dir), load_hf_model(str(tmp_path / "b"))
    tokens = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), mask_experts(full, meta["experts_kept_per_layer"]):
        assert (full(tokens).logits - twice(tokens).logits).abs().max() <= 1e-5
