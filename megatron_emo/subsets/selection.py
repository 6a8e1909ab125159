"""Expert-subset selection for a task (emo_spec.md 5.1 greedy layerwise, 5.2 the others).

Every method scores the routed experts of each layer and keeps the top ``keep_k - S`` of them plus
all ``S`` shared experts; ties go to the lower expert index. The scores:

* ``global``: mean routing probability over the calibration tokens (softmax over the routed
  experts only), one pass through the unpruned model.
* ``greedy-layerwise`` (default, the paper's): the same score for layer l computed with layers
  < l already reduced to their subsets (gate masking, which computes the same as pruning). With
  ``keep_per_layer`` this is the reference's ``layerwise_variable``.
* ``easy-ep`` (arXiv 2504.06792): gate weight x expert-output norm x (1 - cos(x, x + MoE(x)))
  summed over the tokens routed to the expert, one forward (``scoring.easy_ep_scores``).
* ``random``: uniform random scores (``torch.Generator().manual_seed(seed)``, layers in order);
  the examples are not used. The baseline every table needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from megatron_emo.subsets.pruning import mask_experts
from megatron_emo.subsets.scoring import easy_ep_scores, moe_blocks, routing_stats

__all__ = ["METHODS", "Selection", "random_scores", "resolve_keep", "select_experts",
           "select_from_scores", "top_experts"]

Method = Literal["global", "greedy-layerwise", "easy-ep", "random"]
METHODS = ("global", "greedy-layerwise", "easy-ep", "random")


@dataclass
class Selection:
    """Kept original expert indices per layer and how they were chosen (``selection.json``)."""

    experts_kept_per_layer: list[list[int]]
    method: str
    keep_per_layer: list[int]
    scores_per_layer: list[list[float]]
    num_experts_per_layer: list[int]
    num_shared_experts: int
    num_examples: int
    num_tokens: int
    examples_sha256: str | None = None
    source_checkpoint: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def keep_k(self) -> int | None:
        """The common keep count, or None when layers keep different counts."""
        return self.keep_per_layer[0] if len(set(self.keep_per_layer)) == 1 else None

    def to_dict(self) -> dict:
        """The selection as a JSON-ready dict, with ``keep_k`` added."""
        d = asdict(self)
        d["keep_k"] = self.keep_k
        return d

    def save(self, path: str) -> None:
        """Writes the selection to ``path`` as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> Selection:
        """Reads a selection written by ``save`` (the derived ``keep_k`` is dropped)."""
        d = json.load(open(path))
        d.pop("keep_k", None)
        return cls(**d)


def resolve_keep(keep: int | None, keep_per_layer: Sequence[int] | None,
                 num_experts_per_layer: Sequence[int], num_shared_experts: int) -> list[int]:
    """Keep count per layer, checked: ``num_shared < keep_k <= num_experts`` in every layer.

    Raises:
        ValueError: neither or both given, wrong list length, a count out of range.
    """
    n_layers = len(num_experts_per_layer)
    if (keep is None) == (keep_per_layer is None):
        raise ValueError("give exactly one of keep (one count for every layer) and "
                         "keep_per_layer")
    if keep_per_layer is None:
        keeps = [int(keep)] * n_layers
    else:
        keeps = [int(k) for k in keep_per_layer]
        if len(keeps) != n_layers:
            raise ValueError(f"keep_per_layer has {len(keeps)} entries, the model has {n_layers} "
                             f"layers")
    for layer, (k, n) in enumerate(zip(keeps, num_experts_per_layer, strict=True)):
        if not num_shared_experts < k <= n:
            raise ValueError(f"keep_k ({k}) for layer {layer} must satisfy num_shared_experts "
                             f"({num_shared_experts}) < keep_k <= num_experts ({n}); keep_k counts "
                             f"the shared expert(s)")
    return keeps


def top_experts(scores_R: torch.Tensor, num_keep: int) -> list[int]:
    """Indices of the ``num_keep`` highest scores, ascending; ties go to the lower index."""
    order = torch.argsort(-scores_R.double(), stable=True)
    return sorted(int(i) for i in order[:num_keep])


def select_from_scores(scores_R: torch.Tensor, keep_k: int, num_experts: int,
                       num_shared_experts: int) -> list[int]:
    """Kept ids of one layer: top ``keep_k - S`` routed ascending, then the ``S`` shared."""
    routed = top_experts(scores_R, keep_k - num_shared_experts)
    return routed + list(range(num_experts - num_shared_experts, num_experts))


def random_scores(num_routed_per_layer: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Uniform random scores ``(R_l,)`` per layer for ``method="random"``.

    One generator seeded with ``seed`` draws the layers in order.
    """
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(r, generator=gen, dtype=torch.float64) for r in num_routed_per_layer]


def select_experts(model, examples: Sequence[Sequence[int]], keep: int | None = None, *,
                   method: Method = "greedy-layerwise",
                   keep_per_layer: Sequence[int] | None = None, batch_size: int = 8,
                   seed: int = 0, examples_sha256: str | None = None,
                   source_checkpoint: str | None = None) -> Selection:
    """Selects the experts to keep in every layer from calibration examples.

    Args:
        model: an ``EmoForCausalLM`` or an EMO HF directory (loaded in fp32).
        examples: token-id lists (at least one).
        keep: experts kept per layer, the shared expert(s) included (``keep_k``).
        method: ``global``, ``greedy-layerwise`` (spec 5.1), ``easy-ep`` or ``random`` (see
            the module docstring).
        keep_per_layer: a keep count per layer instead of ``keep``.
        batch_size: sequences per forward.
        seed: the ``random`` method's seed (recorded in ``extra``).
        examples_sha256: provenance recorded in the result.
        source_checkpoint: provenance recorded in the result.

    Returns:
        The selection, with every routed expert's score per layer (mean routed probability for
        ``global`` / ``greedy-layerwise``).

    Raises:
        ValueError: bad keep counts, unknown method, no examples (``random`` needs none), not an
            EMO model.
    """
    if isinstance(model, str):
        from megatron_emo.subsets.sources import load_hf_model

        source_checkpoint = source_checkpoint or model
        model = load_hf_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if len(examples) == 0 and method != "random":
        raise ValueError(f"select_experts method {method!r} needs at least one example")
    blocks = moe_blocks(model)
    counts = [b.num_experts for b in blocks]
    num_shared = model.config.num_shared_experts
    keeps = resolve_keep(keep, keep_per_layer, counts, num_shared)
    kept: list[list[int]] = []
    scores: list[list[float]] = []
    num_tokens = 0
    if method == "greedy-layerwise":
        # Layer l is scored with layers < l already reduced, so selection runs layer by layer.
        for layer, block in enumerate(blocks):
            with mask_experts(model, kept):
                stats = routing_stats(model, examples, layers=[layer], batch_size=batch_size)
            num_tokens = stats.num_tokens
            s = stats.mean_probs(layer)
            scores.append(s.tolist())
            kept.append(select_from_scores(s, keeps[layer], block.num_experts, num_shared))
    else:
        # Every layer's scores from one pass (or none), then the same selection per layer.
        if method == "random":
            num_tokens = sum(len(e) for e in examples)
            layer_scores = random_scores([n - num_shared for n in counts], seed)
        elif method == "easy-ep":
            layer_scores, num_tokens = easy_ep_scores(model, examples, batch_size=batch_size)
        else:  # global
            stats = routing_stats(model, examples, batch_size=batch_size)
            num_tokens = stats.num_tokens
            layer_scores = [stats.mean_probs(layer) for layer in range(len(blocks))]
        for layer, (block, s) in enumerate(zip(blocks, layer_scores, strict=True)):
            scores.append(s.tolist())
            kept.append(select_from_scores(s, keeps[layer], block.num_experts, num_shared))
    return Selection(
        experts_kept_per_layer=kept, method=method, keep_per_layer=keeps,
        scores_per_layer=scores, num_experts_per_layer=counts, num_shared_experts=num_shared,
        num_examples=len(examples), num_tokens=num_tokens, examples_sha256=examples_sha256,
        source_checkpoint=source_checkpoint,
        extra={"num_experts_per_tok": min(model.config.num_experts_per_tok, max(keeps)),
               **({"seed": seed} if method == "random" else {})},
    )
