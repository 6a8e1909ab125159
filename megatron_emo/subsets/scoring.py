"""Routing statistics and next-token loss of an EMO HF model over token sequences.

The score of emo_spec.md 5.1: per layer, the mean routing probability of each routed expert over
all non-pad tokens, with the softmax taken over the routed experts only (the shared experts have
their own softmax and are always kept). Gate logits are captured with forward hooks on each
layer's ``mlp.gate``; a forward can stop right after the last layer that is needed (greedy
layerwise selection scores one layer at a time).

Shapes: T tokens, E experts of a layer (shared last), R = E - S routed experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["RoutingStats", "easy_ep_scores", "moe_blocks", "next_token_loss", "padded_batches",
           "routed_probs", "routing_stats"]


def moe_blocks(model) -> list:
    """The ``EmoSparseMoeBlock`` of every layer of an ``EmoForCausalLM``.

    Raises:
        ValueError: the model is not an EMO model.
    """
    if getattr(model.config, "model_type", None) != "emo":
        raise ValueError(f"not an EMO model: config.model_type is "
                         f"{getattr(model.config, 'model_type', None)!r}, expected 'emo'")
    return [layer.mlp for layer in model.model.layers]


def routed_probs(router_logits_TE: torch.Tensor, num_shared_experts: int) -> torch.Tensor:
    """Softmax over the routed (first ``E - S``) logits, in fp32: ``(T, R)``."""
    num_routed = router_logits_TE.shape[-1] - num_shared_experts
    return router_logits_TE[:, :num_routed].float().softmax(dim=-1)


def padded_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches, each ``(B, longest)``."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        longest = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
        yield ids, mask


@dataclass
class RoutingStats:
    """Summed routed probabilities and top-k hits per layer over ``num_tokens`` tokens.

    ``prob_sum[l]`` and ``hit_count[l]`` are ``(R_l,)`` float64 tensors; layers that were not
    requested hold ``None``.
    """

    prob_sum: list[torch.Tensor | None]
    hit_count: list[torch.Tensor | None]
    num_tokens: int
    num_routed_per_tok: list[int]

    def mean_probs(self, layer: int) -> torch.Tensor:
        """Mean routed probability per expert ``(R,)`` (sums to 1)."""
        return self.prob_sum[layer] / max(self.num_tokens, 1)

    def hit_share(self, layer: int) -> torch.Tensor:
        """Share of the routed top-k slots that went to each expert ``(R,)`` (sums to 1)."""
        return self.hit_count[layer] / max(self.num_tokens * self.num_routed_per_tok[layer], 1)


class _StopForward(Exception):
    """Raised by a capture hook after the last layer that is needed."""


@torch.no_grad()
def routing_stats(model, sequences: Sequence[Sequence[int]], *,
                  layers: Sequence[int] | None = None, batch_size: int = 8) -> RoutingStats:
    """Routing statistics of ``model`` over ``sequences`` (pad tokens excluded).

    Args:
        model: an ``EmoForCausalLM`` (masking hooks of ``pruning.mask_experts`` are honoured: the
            statistics see the logits the router used).
        sequences: token-id lists.
        layers: layers to score (default: all); the forward stops after the last of them.
        batch_size: sequences per forward.

    Returns:
        The summed statistics.
    """
    blocks = moe_blocks(model)
    layers = list(range(len(blocks))) if layers is None else sorted(set(layers))
    last = layers[-1]
    prob_sum: list[torch.Tensor | None] = [None] * len(blocks)
    hit_count: list[torch.Tensor | None] = [None] * len(blocks)
    k_routed = [b.top_k - b.num_shared_experts for b in blocks]
    for i in layers:
        r = blocks[i].num_experts - blocks[i].num_shared_experts
        prob_sum[i] = torch.zeros(r, dtype=torch.float64)
        hit_count[i] = torch.zeros(r, dtype=torch.float64)
    valid = {}

    def make_hook(i: int):
        def hook(module, inputs, output):
            probs = routed_probs(output, blocks[i].num_shared_experts)
            m = valid["mask"]
            prob_sum[i] += (probs.double() * m[:, None]).sum(0).cpu()
            ids = probs.topk(k_routed[i], dim=-1).indices
            hit_count[i] += torch.bincount(
                ids.reshape(-1), weights=m.repeat_interleave(k_routed[i]),
                minlength=probs.shape[1]).cpu()
            if i == last:
                raise _StopForward
        return hook

    handles = [blocks[i].gate.register_forward_hook(make_hook(i)) for i in layers]
    device = model.lm_head.weight.device
    num_tokens = 0
    try:
        for ids, mask in padded_batches(sequences, batch_size):
            valid["mask"] = mask.reshape(-1).double().to(device)
            num_tokens += int(mask.sum())
            ids, mask = ids.to(device), mask.to(device)
            try:
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return RoutingStats(prob_sum, hit_count, num_tokens, k_routed)


@torch.no_grad()
def easy_ep_scores(model, sequences: Sequence[Sequence[int]], *, batch_size: int = 8
                   ) -> tuple[list[torch.Tensor], int]:
    """EASY-EP expert scores (arXiv 2504.06792; emo_spec.md 5.2), one forward, unpruned model.

    Per layer and routed expert e: ``sum_t g_te * ||E_e(x_t)|| * s_t / T`` over the non-pad
    tokens t that route to e (e in the token's routed top-k), where ``x_t`` is the MoE block's
    input (the normed hidden state), ``g_te`` the routed weight (softmax over the routed experts,
    as the HF routing), ``E_e(x_t)`` the expert's unweighted output and ``s_t = max(0, 1 -
    cos(x_t, x_t + MoE(x_t)))`` how much the whole MoE block changes the token.

    Returns:
        ``([scores (R_l,) float64 per layer], number of tokens)``.
    """
    blocks = moe_blocks(model)
    scores: list[torch.Tensor] = [
        torch.zeros(b.num_experts - b.num_shared_experts, dtype=torch.float64) for b in blocks]
    valid = {}

    def make_hook(i: int):
        block = blocks[i]
        num_routed = block.num_experts - block.num_shared_experts
        k_routed = block.top_k - block.num_shared_experts

        def hook(module, inputs, output):
            x_TH = inputs[0].reshape(-1, inputs[0].shape[-1])
            moe_out_TH = output[0].reshape(x_TH.shape)
            keep_T = valid["mask"].bool()
            x_TH, moe_out_TH, logits_TE = x_TH[keep_T], moe_out_TH[keep_T], output[1][keep_T]
            s_T = (1 - F.cosine_similarity(x_TH.float(), (x_TH + moe_out_TH).float(), dim=-1)
                   ).clamp(min=0)
            weights_TK, ids_TK = routed_probs(logits_TE, block.num_shared_experts).topk(
                k_routed, dim=-1)
            for e in range(num_routed):
                tok, slot = (ids_TK == e).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                norm_t = block.experts[e](x_TH[tok]).float().norm(dim=-1)
                scores[i][e] += float((weights_TK[tok, slot] * norm_t * s_T[tok]).sum())
        return hook

    handles = [b.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    device = model.lm_head.weight.device
    num_tokens = 0
    try:
        for ids, mask in padded_batches(sequences, batch_size):
            valid["mask"] = mask.reshape(-1).to(device)
            num_tokens += int(mask.sum())
            model.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [s / max(num_tokens, 1) for s in scores], num_tokens


@torch.no_grad()
def next_token_loss(model, sequences: Sequence[Sequence[int]], *, batch_size: int = 8
                    ) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy (nats) over all predicted positions.

    Returns:
        ``(mean loss, number of predicted tokens)``; each sequence of n tokens predicts n - 1.
    """
    total = 0.0
    count = 0
    device = model.lm_head.weight.device
    for ids, mask in padded_batches(sequences, batch_size):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                       output_router_logits=False).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    if count == 0:
        raise ValueError("next_token_loss needs at least one sequence with 2+ tokens")
    return total / count, count
