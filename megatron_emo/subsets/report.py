"""Modularity report: per-domain expert usage, specialisation, overlap and subset quality.

The library behind ``tools/modularity_report.py``. Input: an EMO model and a preprocessed corpus
(Megatron ``IndexedDataset`` ``PREFIX.bin/.idx``, one document per entry ending with EOD, plus the
sidecar ``PREFIX.metadata.jsonl`` whose line i holds document i's ``domain``). Each domain's
documents are split deterministically (even positions -> selection half, odd -> held-out half).
Per layer and domain (selection half): mean routed probability and top-k hit share per expert,
specialisation (routing mass in the domain's top 25% experts) and the Jaccard overlap of those
top-25% sets between domains. Subset quality: held-out next-token loss of each domain with its own
subset (selected on its selection half) at each fraction of experts, against the full model; the
subset is applied by gate masking (``pruning.mask_experts``, equal to the pruned model). The
baseline column: the mean held-out loss of ``num_random`` random subsets of the same size
(``selection.random_scores`` with seeds ``random_seed + r``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence

import torch

from megatron_emo.subsets.pruning import mask_experts
from megatron_emo.subsets.scoring import RoutingStats, moe_blocks, next_token_loss, routing_stats
from megatron_emo.subsets.selection import Method, random_scores, select_experts, select_from_scores

__all__ = ["DEFAULT_FRACTIONS", "NUM_RANDOM", "build_modularity_report", "domain_subset_losses",
           "fraction_keep", "load_domain_corpus", "modularity_report", "split_halves",
           "top_share_set"]

DEFAULT_FRACTIONS = (0.125, 0.25, 0.5)
TOP_SHARE = 0.25
NUM_RANDOM = 3


def load_domain_corpus(prefix: str, *, max_docs_per_domain: int | None = None,
                       max_tokens: int | None = None) -> tuple[dict[str, list[list[int]]], dict]:
    """Documents per domain from ``PREFIX.bin/.idx`` and ``PREFIX.metadata.jsonl``.

    Args:
        prefix: the IndexedDataset prefix (``..._text_document``).
        max_docs_per_domain: keep the first N documents of each domain (corpus order).
        max_tokens: truncate each document to this many tokens.

    Returns:
        ``({domain: [token ids, ...]}, info)`` with domains sorted by name; ``info`` counts the
        documents read and those without a domain.

    Raises:
        ValueError: missing files, sidecar / index count mismatch, bad sidecar lines.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sidecar = prefix + ".metadata.jsonl"
    for path in (prefix + ".bin", prefix + ".idx", sidecar):
        if not os.path.isfile(path):
            raise ValueError(f"corpus file {path} is missing (PREFIX = {prefix})")
    lines = [ln for ln in open(sidecar).read().splitlines() if ln.strip()]
    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    num_docs = len(bounds) - 1
    if len(lines) != num_docs:
        raise ValueError(f"{sidecar} has {len(lines)} lines, {prefix}.idx has {num_docs} "
                         f"documents (line i must describe document i)")
    docs: dict[str, list[list[int]]] = {}
    no_domain = 0
    for i, line in enumerate(lines):
        try:
            domain = json.loads(line).get("domain")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{sidecar} line {i + 1} is not a JSON object: {line[:80]!r}") from e
        if domain is None:
            no_domain += 1
            continue
        domain = str(domain)
        bucket = docs.setdefault(domain, [])
        if max_docs_per_domain is not None and len(bucket) >= max_docs_per_domain:
            continue
        ids = [int(t) for s in range(bounds[i], bounds[i + 1]) for t in ds[s]]
        bucket.append(ids[:max_tokens] if max_tokens else ids)
    if not docs:
        raise ValueError(f"{sidecar} names no 'domain' in any of its {len(lines)} lines")
    info = {"num_documents": num_docs, "documents_without_domain": no_domain}
    return dict(sorted(docs.items())), info


def split_halves(docs: Sequence[Sequence[int]]) -> tuple[list, list]:
    """Deterministic halves: even positions -> selection, odd positions -> held-out."""
    return list(docs[0::2]), list(docs[1::2])


def fraction_keep(fraction: float, num_experts: int, num_shared_experts: int) -> int:
    """``keep_k`` (shared included) for a fraction of a layer's experts, at least S + 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"expert fraction {fraction} must be in (0, 1]")
    return max(num_shared_experts + 1, min(num_experts, math.floor(fraction * num_experts + 0.5)))


def top_share_set(mean_probs_R: torch.Tensor, share: float = TOP_SHARE) -> list[int]:
    """The top ``share`` of routed experts by mean probability (ties -> lower index)."""
    n = max(1, round(share * mean_probs_R.numel()))
    order = torch.argsort(-mean_probs_R.double(), stable=True)
    return sorted(int(i) for i in order[:n])


def domain_subset_losses(model, selection_docs: Sequence[Sequence[int]],
                         heldout_docs: Sequence[Sequence[int]],
                         fractions: Sequence[float] = DEFAULT_FRACTIONS, *,
                         method: Method = "global", batch_size: int = 8,
                         stats: RoutingStats | None = None, num_random: int = NUM_RANDOM,
                         random_seed: int = 0) -> dict:
    """Held-out loss of the full model, of selected subsets and of random subsets.

    The subsets are selected on ``selection_docs``; the random ones have the same sizes.

    Args:
        model: an ``EmoForCausalLM``.
        selection_docs: calibration documents of the domain.
        heldout_docs: evaluation documents of the domain.
        fractions: fractions of each layer's experts to keep (shared included).
        method: selection method; ``global`` reuses one scoring pass for every fraction.
        batch_size: sequences per forward.
        stats: routing statistics of ``selection_docs`` already computed (``global`` only).
        num_random: random subsets per fraction (0: no baseline).
        random_seed: seed of the first random subset.

    Returns:
        ``{"full_loss", "num_tokens", "subsets": [{"fraction", "keep_per_layer", "loss",
        "experts_kept_per_layer", "loss_random", "losses_random"}]}``; ``loss_random`` is the
        mean of ``losses_random`` (None without random subsets).
    """
    blocks = moe_blocks(model)
    num_shared = model.config.num_shared_experts
    full, n_tok = next_token_loss(model, heldout_docs, batch_size=batch_size)
    if method == "global" and stats is None:
        stats = routing_stats(model, selection_docs, batch_size=batch_size)
    subsets = []
    for f in fractions:
        keeps = [fraction_keep(f, b.num_experts, num_shared) for b in blocks]
        if method == "global":
            kept = [select_from_scores(stats.mean_probs(i), k, b.num_experts, num_shared)
                    for i, (k, b) in enumerate(zip(keeps, blocks, strict=True))]
        else:
            kept = select_experts(model, selection_docs, keep_per_layer=keeps, method=method,
                                  batch_size=batch_size).experts_kept_per_layer
        with mask_experts(model, kept):
            loss, _ = next_token_loss(model, heldout_docs, batch_size=batch_size)
        random_losses = []
        for r in range(num_random):
            scores = random_scores([b.num_experts - num_shared for b in blocks], random_seed + r)
            rand_kept = [select_from_scores(sc, k, b.num_experts, num_shared)
                         for sc, k, b in zip(scores, keeps, blocks, strict=True)]
            with mask_experts(model, rand_kept):
                random_losses.append(next_token_loss(model, heldout_docs,
                                                     batch_size=batch_size)[0])
        subsets.append({"fraction": f, "keep_per_layer": keeps, "loss": loss,
                        "experts_kept_per_layer": kept, "losses_random": random_losses,
                        "loss_random": (sum(random_losses) / len(random_losses)
                                        if random_losses else None)})
    return {"full_loss": full, "num_tokens": n_tok, "subsets": subsets}


def _jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def modularity_report(model, corpus: dict[str, list[list[int]]], output_dir: str, *,
                      fractions: Sequence[float] = DEFAULT_FRACTIONS, method: Method = "global",
                      batch_size: int = 8, info: dict | None = None,
                      num_random: int = NUM_RANDOM,
                      log: Callable[[str], None] = print) -> dict:
    """Computes the report numbers, writes ``report.json``, the PNG figures and ``report.html``.

    Args:
        model: an ``EmoForCausalLM``.
        corpus: ``{domain: documents}`` (see ``load_domain_corpus``); 2+ documents per domain.
        output_dir: created.
        fractions: expert fractions for the subset-quality table.
        method: selection method for the subsets.
        batch_size: sequences per forward.
        info: extra provenance stored under ``"source"``.
        num_random: random subsets per fraction for the baseline column.
        log: progress messages.

    Returns:
        The ``report.json`` content.

    Raises:
        ValueError: a domain with fewer than 2 documents.
    """
    from megatron_emo.subsets.figures import write_figures_and_html

    blocks = moe_blocks(model)
    num_layers = len(blocks)
    domains = list(corpus)
    for d in domains:
        if len(corpus[d]) < 2:
            raise ValueError(f"domain {d!r} has {len(corpus[d])} document(s); the report needs "
                             f"2+ per domain (selection and held-out halves)")
    usage_prob: dict[str, list[list[float]]] = {}
    usage_hits: dict[str, list[list[float]]] = {}
    specialisation: dict[str, list[float]] = {}
    top_sets: dict[str, list[list[int]]] = {}
    losses: dict[str, dict] = {}
    docs_info: dict[str, dict] = {}
    for d in domains:
        sel_docs, held = split_halves(corpus[d])
        log(f"domain {d}: {len(sel_docs)} selection / {len(held)} held-out documents")
        stats = routing_stats(model, sel_docs, batch_size=batch_size)
        usage_prob[d] = [stats.mean_probs(i).tolist() for i in range(num_layers)]
        usage_hits[d] = [stats.hit_share(i).tolist() for i in range(num_layers)]
        top_sets[d] = [top_share_set(stats.mean_probs(i)) for i in range(num_layers)]
        specialisation[d] = [float(stats.mean_probs(i)[top_sets[d][i]].sum())
                             for i in range(num_layers)]
        losses[d] = domain_subset_losses(model, sel_docs, held, fractions, method=method,
                                         batch_size=batch_size,
                                         stats=stats if method == "global" else None,
                                         num_random=num_random)
        docs_info[d] = {"selection_documents": len(sel_docs), "heldout_documents": len(held),
                        "selection_tokens": stats.num_tokens,
                        "heldout_predicted_tokens": losses[d]["num_tokens"]}
    overlap = [[[_jaccard(top_sets[a][i], top_sets[b][i]) for b in domains] for a in domains]
               for i in range(num_layers)]
    report = {
        "source": info or {},
        "domains": domains,
        "documents": docs_info,
        "num_layers": num_layers,
        "num_experts_per_layer": [b.num_experts for b in blocks],
        "num_shared_experts": model.config.num_shared_experts,
        "routed_top_k_per_layer": [b.top_k - b.num_shared_experts for b in blocks],
        "method": method,
        "fractions": list(fractions),
        "num_random": num_random,
        "top_share": TOP_SHARE,
        "usage_mean_prob": usage_prob,
        "usage_topk_share": usage_hits,
        "top_share_experts": top_sets,
        "specialisation": specialisation,
        "overlap_jaccard": overlap,
        "overlap_jaccard_mean": [[sum(overlap[i][a][b] for i in range(num_layers)) / num_layers
                                  for b in range(len(domains))] for a in range(len(domains))],
        "losses": losses,
    }
    os.makedirs(output_dir, exist_ok=True)
    report["figures"] = write_figures_and_html(report, output_dir)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {os.path.join(output_dir, 'report.html')} and report.json")
    return report


def build_modularity_report(checkpoint: str, data_prefix: str, output_dir: str, *,
                            max_docs_per_domain: int | None = None,
                            max_tokens: int | None = None,
                            fractions: Sequence[float] = DEFAULT_FRACTIONS,
                            method: Method = "global", batch_size: int = 8,
                            tokenizer: str | None = None, device: str = "cpu",
                            dtype: str = "float32", num_random: int = NUM_RANDOM,
                            log: Callable[[str], None] = print) -> dict:
    """Checkpoint (HF or Megatron) + corpus prefix -> ``output_dir/report.{html,json}``.

    ``max_tokens`` defaults to the model's ``max_position_embeddings``; ``device`` and
    ``dtype`` are those of the HF model that computes the numbers.
    """
    import shutil
    import tempfile

    from megatron_emo.subsets.sources import load_hf_model, read_emo_config, resolve_hf_dir

    for f in fractions:
        fraction_keep(f, 2, 0)  # range check before any work
    workdir = tempfile.mkdtemp(prefix="emo_report_")
    try:
        hf_dir = resolve_hf_dir(checkpoint, workdir, tokenizer=tokenizer, log=log)
        cfg = read_emo_config(hf_dir)
        max_tokens = max_tokens or cfg.get("max_position_embeddings", 4096)
        corpus, info = load_domain_corpus(data_prefix, max_docs_per_domain=max_docs_per_domain,
                                          max_tokens=max_tokens)
        bad = sorted({t for docs in corpus.values() for doc in docs for t in doc
                      if not 0 <= t < cfg["vocab_size"]})
        if bad:
            raise ValueError(f"corpus token ids {bad[:5]} are outside the model vocabulary "
                             f"[0, {cfg['vocab_size']})")
        info.update(checkpoint=os.path.abspath(checkpoint), data_prefix=os.path.abspath(
            data_prefix), max_docs_per_domain=max_docs_per_domain, max_tokens=max_tokens)
        model = load_hf_model(hf_dir, dtype, device)
        return modularity_report(model, corpus, output_dir, fractions=fractions, method=method,
                                 batch_size=batch_size, info=info, num_random=num_random,
                                 log=log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
