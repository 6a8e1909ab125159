"""CUDA scoring equals CPU scoring: selection, pruned-vs-masked logits and report numbers.

Marker ``gpu`` (deselected by default). Needs no megatron (HF model and in-memory corpus only).
Run on a GPU machine: ``python -m pytest -m gpu tests/subsets/test_gpu.py -q``

NOTE: not yet run on a GPU (the device machine of the session that wrote it sees another
checkout); its logic was checked on CPU by substituting ``cpu`` for ``cuda``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_emo.subsets import (
    mask_experts,
    modularity_report,
    prune_hf_dir,
    select_and_export,
    select_experts,
)
from megatron_emo.subsets.selection import METHODS
from megatron_emo.subsets.sources import load_hf_model

pytestmark = pytest.mark.gpu


def _docs(n, lo, hi, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(lo, hi, (int(torch.randint(6, 40, (1,), generator=gen)),),
                          generator=gen).tolist() + [0] for _ in range(n)]


def test_cuda_matches_cpu(tmp_path, tiny_hf_dir):
    cpu = load_hf_model(tiny_hf_dir)
    gpu = load_hf_model(tiny_hf_dir, device="cuda")
    ex = _docs(9, 2, 128, 0)
    for method in METHODS:
        a = select_experts(cpu, ex, 4, method=method, batch_size=4)
        b = select_experts(gpu, ex, 4, method=method, batch_size=4)
        assert a.experts_kept_per_layer == b.experts_kept_per_layer, method
        diff = (torch.tensor(a.scores_per_layer) - torch.tensor(b.scores_per_layer)).abs().max()
        print(f"{method}: max score diff cpu vs cuda {diff:.2e}")
        assert diff <= 1e-5
    prune_hf_dir(tiny_hf_dir, str(tmp_path / "p"), a.experts_kept_per_layer)
    pruned = load_hf_model(str(tmp_path / "p"), device="cuda")
    tokens = torch.randint(2, 128, (3, 21), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad(), mask_experts(gpu, a.experts_kept_per_layer):
        masked = gpu(tokens).logits
    with torch.no_grad():
        got = pruned(tokens).logits
    print(f"pruned vs masked on cuda: {(got - masked).abs().max().item():.2e}")
    assert (got - masked).abs().max() <= 1e-4

    corpus = {"a": _docs(6, 2, 60, 1), "b": _docs(6, 60, 128, 2)}
    ra = modularity_report(cpu, corpus, str(tmp_path / "ra"), fractions=[0.25, 0.5],
                           log=lambda m: None)
    rb = modularity_report(gpu, corpus, str(tmp_path / "rb"), fractions=[0.25, 0.5],
                           log=lambda m: None)
    for d in corpus:
        la, lb = ra["losses"][d], rb["losses"][d]
        assert abs(la["full_loss"] - lb["full_loss"]) <= 1e-4
        for sa, sb in zip(la["subsets"], lb["subsets"], strict=True):
            assert sa["experts_kept_per_layer"] == sb["experts_kept_per_layer"]
            assert abs(sa["loss"] - sb["loss"]) <= 1e-4
    bf16 = load_hf_model(tiny_hf_dir, dtype="bfloat16", device="cuda")
    sel = select_experts(bf16, ex, 4, method="global")
    assert all(k[-1] == 7 for k in sel.experts_kept_per_layer)


def test_select_and_export_on_cuda_without_megatron(tmp_path, tiny_hf_dir):
    import json

    ex = tmp_path / "ex.jsonl"
    ex.write_text("\n".join(json.dumps({"tokens": d}) for d in _docs(3, 2, 128, 5)) + "\n")
    sel = select_and_export(tiny_hf_dir, str(ex), str(tmp_path / "o"), keep=4, megatron=False,
                            device="cuda")
    assert len(sel.experts_kept_per_layer) == 2
