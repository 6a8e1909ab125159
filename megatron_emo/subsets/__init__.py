"""Expert subsets of EMO models: selection (spec 5.1/5.2), pruned export (4.4), modularity report.

``sources`` reads checkpoints and examples, ``scoring`` computes routing statistics and losses with
the HF model, ``selection`` picks experts, ``pruning`` applies a subset (masking or pruning, HF and
Megatron), ``report`` builds the per-domain modularity report. Nothing here imports megatron at
module level; Megatron is used only to export / import torch_dist checkpoints.
"""

from megatron_emo.subsets.pipeline import select_and_export
from megatron_emo.subsets.pruning import (
    export_megatron_subset,
    mask_experts,
    prune_hf_dir,
    prune_hf_model,
)
from megatron_emo.subsets.report import (
    build_modularity_report,
    domain_subset_losses,
    load_domain_corpus,
    modularity_report,
)
from megatron_emo.subsets.scoring import next_token_loss, routing_stats
from megatron_emo.subsets.selection import Selection, select_experts
from megatron_emo.subsets.sources import load_examples, load_hf_model, resolve_hf_dir

__all__ = ["Selection", "build_modularity_report", "domain_subset_losses",
           "export_megatron_subset", "load_domain_corpus", "load_examples", "load_hf_model",
           "mask_experts", "modularity_report", "next_token_loss", "prune_hf_dir",
           "prune_hf_model", "resolve_hf_dir", "routing_stats", "select_and_export",
           "select_experts"]
