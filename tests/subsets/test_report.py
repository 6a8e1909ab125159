"""``tools/modularity_report.py`` end to end on a tiny EMO model and a 3-domain synthetic corpus.

The corpus is a Megatron IndexedDataset built with ``IndexedDatasetBuilder`` plus a handwritten
``.metadata.jsonl`` sidecar. Checks: the PNG/HTML/JSON files are written; usage shares are
distributions, specialisation and overlaps lie in [0, 1]; the full-model held-out loss equals a
direct ``EmoForCausalLM(labels=...)`` computation; each subset loss (gate masking) equals the loss
of the physically pruned model; the random-subset baseline column is the mean loss of the 3
seeded random subsets of the same size (computed here by hand); bad corpora and fractions are
refused.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/subsets/test_report.py -q``
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

from megatron_emo.subsets import prune_hf_model
from megatron_emo.subsets.sources import load_hf_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import modularity_report  # noqa: E402

EOD = 0
DOMAINS = {"code": (2, 40), "math": (41, 80), "web": (81, 127)}


def write_corpus(prefix: str, docs_per_domain: int = 6, seed: int = 0, extra_lines: int = 0
                 ) -> None:
    """Interleaved documents of 3 domains (disjoint token ranges), each ending with EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    gen = torch.Generator().manual_seed(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=__import__("numpy").int32)
    lines = []
    for i in range(docs_per_domain):
        for name, (lo, hi) in DOMAINS.items():
            n = int(torch.randint(8, 30, (1,), generator=gen))
            doc = torch.cat([torch.randint(lo, hi + 1, (n,), generator=gen), torch.tensor([EOD])])
            builder.add_document(doc, [len(doc)])
            lines.append(json.dumps({"domain": name, "source": "synthetic", "id": f"{name}{i}"}))
    doc = torch.tensor([5, 6, 7, EOD])
    builder.add_document(doc, [4])
    lines.append(json.dumps({"domain": None, "source": "synthetic", "id": "nodomain"}))
    builder.finalize(prefix + ".idx")
    with open(prefix + ".metadata.jsonl", "w") as f:
        f.write("\n".join(lines + ['{"domain": "x"}'] * extra_lines) + "\n")


def _direct_loss(model, docs):
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc])
            out = model(ids, labels=ids, output_router_logits=False)
            total += float(out.loss) * (len(doc) - 1)
            count += len(doc) - 1
    return total / count


def test_report_end_to_end(tmp_path, tiny_hf_dir):
    from megatron_emo.subsets.report import load_domain_corpus, split_halves

    prefix = str(tmp_path / "corpus_text_document")
    write_corpus(prefix)
    out = tmp_path / "report"
    modularity_report.main([tiny_hf_dir, "--data-prefix", prefix, "--output", str(out),
                            "--max-docs", "5", "--batch-size", "3"])
    for name in ("report.html", "report.json", "usage_mean_prob.png", "usage_topk_share.png",
                 "overlap_jaccard.png", "specialisation.png", "subset_loss.png"):
        assert os.path.getsize(out / name) > 100, name
    html = (out / "report.html").read_text()
    assert "<img src='usage_mean_prob.png'>" in html and "held-out next-token loss" in html
    assert "<th>random 0.25 (keep 2)</th>" in html
    rep = json.load(open(out / "report.json"))
    assert rep["domains"] == ["code", "math", "web"]
    assert rep["source"]["documents_without_domain"] == 1
    assert rep["documents"]["math"]["selection_documents"] == 3
    assert rep["documents"]["math"]["heldout_documents"] == 2
    for d in rep["domains"]:
        for layer in range(2):
            for key in ("usage_mean_prob", "usage_topk_share"):
                v = torch.tensor(rep[key][d][layer])
                assert v.shape == (7,) and (v >= 0).all() and (v <= 1).all()
                assert abs(float(v.sum()) - 1) < 1e-6
            assert 2 / 7 - 1e-9 <= rep["specialisation"][d][layer] <= 1
    for layer_mat in rep["overlap_jaccard"]:
        m = torch.tensor(layer_mat)
        assert (m >= 0).all() and (m <= 1).all() and torch.equal(m, m.T)
        assert torch.equal(m.diag(), torch.ones(3))

    model = load_hf_model(tiny_hf_dir)
    corpus, _ = load_domain_corpus(prefix, max_docs_per_domain=5)
    for d in rep["domains"]:
        _, held = split_halves(corpus[d])
        loss = rep["losses"][d]
        assert abs(loss["full_loss"] - _direct_loss(model, held)) < 1e-5
        assert [s["keep_per_layer"] for s in loss["subsets"]] == [[2, 2], [2, 2], [4, 4]]
        for s in loss["subsets"]:
            pruned = prune_hf_model(copy.deepcopy(model), s["experts_kept_per_layer"])
            assert abs(s["loss"] - _direct_loss(pruned, held)) < 1e-5
            assert all(k[-1] == 7 for k in s["experts_kept_per_layer"])
            random_losses = []
            for seed in range(3):  # the baseline: seeds 0, 1, 2 of the random method
                gen = torch.Generator().manual_seed(seed)
                kept = [sorted(torch.rand(7, generator=gen, dtype=torch.float64)
                               .argsort(descending=True)[:k - 1].tolist()) + [7]
                        for k in s["keep_per_layer"]]
                random_losses.append(_direct_loss(prune_hf_model(copy.deepcopy(model), kept),
                                                  held))
            assert s["losses_random"] == pytest.approx(random_losses, abs=1e-5)
            assert s["loss_random"] == pytest.approx(sum(random_losses) / 3, abs=1e-5)


def test_greedy_report_and_bad_corpora(tmp_path, tiny_hf_dir):
    from megatron_emo.subsets.report import build_modularity_report

    prefix = str(tmp_path / "c_text_document")
    write_corpus(prefix, docs_per_domain=2)
    rep = build_modularity_report(tiny_hf_dir, prefix, str(tmp_path / "g"),
                                  fractions=[0.5], method="greedy-layerwise", log=lambda m: None)
    assert rep["method"] == "greedy-layerwise" and len(rep["losses"]["web"]["subsets"]) == 1

    with pytest.raises(ValueError, match=r"expert fraction 0.0 must be in \(0, 1\]"):
        modularity_report.main([tiny_hf_dir, "--data-prefix", prefix, "--output",
                                str(tmp_path / "x"), "--fractions", "0,0.5"])
    with pytest.raises(ValueError, match="domain 'code' has 1 document"):
        build_modularity_report(tiny_hf_dir, prefix, str(tmp_path / "y"), max_docs_per_domain=1,
                                log=lambda m: None)
    bad = str(tmp_path / "bad_text_document")
    write_corpus(bad, docs_per_domain=2, extra_lines=2)
    with pytest.raises(ValueError, match=r"metadata.jsonl has 9 lines, .*\.idx has 7 documents"):
        build_modularity_report(tiny_hf_dir, bad, str(tmp_path / "z"), log=lambda m: None)
    with pytest.raises(ValueError, match="corpus file .*missing.bin is missing"):
        build_modularity_report(tiny_hf_dir, str(tmp_path / "missing"), str(tmp_path / "w"),
                                log=lambda m: None)


def test_megatron_checkpoint_input_matches_hf(tmp_path, tiny_hf_dir, model_parallel):
    from megatron_emo.conversion.from_hf import import_from_hf
    from megatron_emo.subsets.report import build_modularity_report

    prefix = str(tmp_path / "c_text_document")
    write_corpus(prefix, docs_per_domain=2)
    import_from_hf(tiny_hf_dir, str(tmp_path / "m"))
    msgs = []
    a = build_modularity_report(str(tmp_path / "m"), prefix, str(tmp_path / "a"), fractions=[0.5],
                                log=msgs.append)
    b = build_modularity_report(tiny_hf_dir, prefix, str(tmp_path / "b"), fractions=[0.5],
                                log=lambda m: None)
    assert any("exporting it to HF" in m for m in msgs)
    for d in a["domains"]:
        assert a["losses"][d]["full_loss"] == pytest.approx(b["losses"][d]["full_loss"], abs=1e-6)
        torch.testing.assert_close(torch.tensor(a["usage_mean_prob"][d]),
                                   torch.tensor(b["usage_mean_prob"][d]), atol=1e-6, rtol=0)
