"""Per-EP-rank load of the 1B14B recipe's MoE layer: in-router shared expert vs balanced layout.

Runs the real ``EMORouter`` (CPU, one process) with the recipe's flags in both layouts on the same
hidden states (micro-batches of 4 x 4096 tokens; each document of random length has its own
mean activation plus per-token noise, router rows of equal norm: a router that favours no expert
over many documents, as load balancing trains it to be; pools 8..128) and counts the token-expert
assignments each EP rank would receive under Megatron's contiguous expert sharding (what the
all-to-all dispatcher sends). Layouts:

* in-router: ``--num-experts 128 --emo-num-shared-experts 1 --moe-router-topk 8`` (expert 127
  always on, hosted by the last EP rank);
* balanced: ``--moe-shared-expert-intermediate-size 1024 --emo-num-shared-experts 0
  --num-experts 127+Pd --emo-num-padding-experts Pd --moe-router-topk 7`` with Pd = (-127) mod EP
  (the shared expert runs on every rank, outside the dispatch).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ep_load.py [--microbatches 8]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

BATCH, SEQ, HIDDEN = 4, 4096, 2048
NUM_ROUTED, ROUTED_SLOTS = 127, 7
EP_SIZES = (2, 4, 8)


def _config(layout: str, ep: int):
    from megatron_emo.mcore import EMOTransformerConfig

    common = dict(
        num_layers=16, hidden_size=HIDDEN, num_attention_heads=16, moe_ffn_hidden_size=1024,
        emo_pool_size_min=8, emo_pool_size_max=128, emo_pool_size_eval=32,
        moe_router_dtype="fp32", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=1e-3,
        add_bias_linear=False, use_cpu_initialization=True, init_method_std=0.02,
    )
    if layout == "in-router":
        return EMOTransformerConfig(num_moe_experts=NUM_ROUTED + 1, emo_num_shared_experts=1,
                                    moe_router_topk=ROUTED_SLOTS + 1, **common)
    padding = (-NUM_ROUTED) % ep
    return EMOTransformerConfig(
        num_moe_experts=NUM_ROUTED + padding, emo_num_padding_experts=padding,
        moe_router_topk=ROUTED_SLOTS, moe_shared_expert_intermediate_size=1024, **common,
    )


def _documents(gen: torch.Generator, iteration: int):
    from megatron_emo.routing import DocumentBatch

    ids, offset = [], 0
    for _ in range(BATCH):
        num_docs = int(torch.randint(2, 20, (1,), generator=gen))
        cuts = torch.randperm(SEQ - 1, generator=gen)[: num_docs - 1] + 1
        starts = torch.zeros(SEQ, dtype=torch.int64)
        starts[cuts] = 1
        ids.append(torch.cumsum(starts, 0) + offset)
        offset += num_docs
    return DocumentBatch(torch.stack(ids), 10_000 * iteration + torch.arange(offset), iteration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args()

    from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection

    from megatron_emo.cpu import initialize_model_parallel_cpu
    from megatron_emo.mcore import EMORouter, routing_context
    from megatron_emo.mcore.config import uniform_routing_ep_loads

    from helpers import free_port, init_gloo

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_gloo(0, 1, free_port())
    initialize_model_parallel_cpu(seed=1)
    pgs = ProcessGroupCollection.use_mpu_process_groups()

    # One router weight for the 127 routed experts, shared by both layouts. Rows of equal norm:
    # with isotropic inputs every expert is then equally likely, the router a balanced one.
    gen = torch.Generator().manual_seed(0)
    routed_weight = torch.randn(NUM_ROUTED, HIDDEN, generator=gen)
    routed_weight *= 0.02 * HIDDEN**0.5 / routed_weight.norm(dim=1, keepdim=True)
    inputs = []
    for iteration in range(args.microbatches):
        docs = _documents(gen, iteration)
        # Every document has its own mean activation (its "domain") plus per-token noise.
        doc_means_DH = torch.randn(docs.num_docs, HIDDEN, generator=gen)
        noise_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
        hidden_SBH = (doc_means_DH[docs.doc_ids.t()] + noise_SBH) * 0.5**0.5
        inputs.append((hidden_SBH.contiguous(), docs))

    rows = []
    for ep in EP_SIZES:
        for layout in ("in-router", "balanced"):
            config = _config(layout, ep)
            router = EMORouter(config, pg_collection=pgs)
            router.set_layer_number(1)
            extra = config.num_moe_experts - NUM_ROUTED
            with torch.no_grad():
                router.weight.copy_(torch.cat([routed_weight, torch.zeros(extra, HIDDEN)]))
            router.train()
            per_expert = torch.zeros(config.num_moe_experts)
            for hidden, docs in inputs:
                with routing_context(docs), torch.no_grad():
                    _, routing_map = router(hidden)
                per_expert += routing_map.sum(0).float()
            per_rank = per_expert.reshape(ep, -1).sum(1)
            uniform = uniform_routing_ep_loads(
                num_routed=NUM_ROUTED, num_padding=config.emo_num_padding_experts,
                num_shared=config.emo_num_shared_experts, num_slots=ROUTED_SLOTS, ep_size=ep,
            )
            rows.append((
                ep, layout, config.num_moe_experts, config.emo_num_padding_experts,
                float(per_rank.max() / per_rank.mean()), max(uniform) / (sum(uniform) / ep),
                float(per_rank.max() / per_rank.min()), int(per_rank.argmax()),
            ))

    tokens = BATCH * SEQ * args.microbatches
    print(f"tokens: {tokens:,} ({args.microbatches} micro-batches of {BATCH} x {SEQ}); "
          "measured = EMORouter routing maps summed per EP rank")
    print("| EP | layout | experts (padding) | max/mean measured | max/mean uniform routing "
          "| max/min measured | busiest rank |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for ep, layout, experts, padding, ratio, uniform, spread, busiest in rows:
        print(f"| {ep} | {layout} | {experts} ({padding}) | {ratio:.3f} | {uniform:.3f} "
              f"| {spread:.3f} | {busiest} |")


if __name__ == "__main__":
    main()
