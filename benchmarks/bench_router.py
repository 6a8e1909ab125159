"""Router latency: vectorised ``emo_route`` vs a per-document loop (allenai/EMO style) vs Megatron's TopKRouter.

Same inputs for every contender: T = 4 x 4096 tokens, E = 128 (127 routed + 1 shared), top-8,
pool sizes from ``sample_pool_sizes`` in [8, 128], at 10 and 400 documents per sequence.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_router.py [--device cpu|cuda] [--repeats N]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron_emo.routing import emo_route, sample_pool_sizes  # noqa: E402

BATCH, SEQ = 4, 4096
NUM_EXPERTS, NUM_SHARED, TOPK = 128, 1, 8
POOL_MIN, POOL_MAX = 8, 128
DOCS_PER_SEQ = (10, 400)


def make_inputs(docs_per_seq: int, device: torch.device, seed: int = 0):
    """Logits ``(T, E)``, dense doc ids ``(T,)`` and pool sizes ``(D,)`` for one setting."""
    gen = torch.Generator().manual_seed(seed + docs_per_seq)
    logits = torch.randn(BATCH * SEQ, NUM_EXPERTS, generator=gen)
    ids = []
    offset = 0
    for _ in range(BATCH):
        # Random document lengths: docs_per_seq - 1 distinct cut points inside the window.
        cuts = torch.randperm(SEQ - 1, generator=gen)[: docs_per_seq - 1] + 1
        starts = torch.zeros(SEQ, dtype=torch.int64)
        starts[cuts] = 1
        ids.append(torch.cumsum(starts, 0) + offset)
        offset += docs_per_seq
    doc_ids = torch.cat(ids)
    pool_sizes = sample_pool_sizes(
        torch.arange(offset, dtype=torch.int64) + 1000 * docs_per_seq,
        seed=1234, iteration=1, layer=0, min_size=POOL_MIN, max_size=POOL_MAX,
    )
    return logits.to(device), doc_ids.to(device), pool_sizes.to(device)


def loop_route(logits: torch.Tensor, doc_ids: torch.Tensor, pool_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EMO routing as the reference router does it: a Python loop over documents with host syncs.

    Per document: softmax over the routed logits, sum over its tokens, ``topk`` of the experts to
    discard, masked index-put; then one masked softmax + top-k over all tokens. Documents are
    found on the host (``.tolist()``) and each pool size is read with ``.item()``.
    """
    num_routed = NUM_EXPERTS - NUM_SHARED
    routed = logits[:, :num_routed].float()
    # Host copy of the boundaries (the reference copies its EOS positions with .cpu().tolist()).
    change = (doc_ids[1:] != doc_ids[:-1]).nonzero().flatten() + 1
    bounds = [0] + change.tolist() + [doc_ids.shape[0]]
    discard_mask = torch.zeros_like(routed, dtype=torch.bool)
    for start, end in zip(bounds[:-1], bounds[1:]):
        doc = int(doc_ids[start].item())
        pool = int(pool_sizes[doc].item())
        num_discard = num_routed - pool
        if num_discard <= 0:
            continue
        scores = torch.softmax(routed[start:end], dim=-1).sum(dim=0)
        discard = torch.topk(-scores, num_discard, dim=-1).indices
        discard_mask[start:end, discard] = True
    masked = routed.masked_fill(discard_mask, float("-inf"))
    scores = torch.softmax(masked, dim=-1)
    top = torch.topk(scores, TOPK - NUM_SHARED, dim=-1)
    probs = torch.zeros_like(scores).scatter(1, top.indices, top.values)
    routing_map = torch.zeros_like(discard_mask).scatter(1, top.indices, True)
    ones = torch.ones(routed.shape[0], NUM_SHARED, device=logits.device)
    probs = torch.cat([probs, ones], dim=1).to(logits.dtype)
    routing_map = torch.cat([routing_map, ones.bool()], dim=1)
    return probs, routing_map


def build_stock_router(device: torch.device) -> tuple[Callable[[torch.Tensor], tuple], str]:
    """Megatron's TopKRouter (pre-softmax top-8 over 128 experts, no aux loss), in eval mode."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    try:
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.moe.router import TopKRouter

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        config = TransformerConfig(
            num_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            num_moe_experts=NUM_EXPERTS,
            moe_router_topk=TOPK,
            moe_router_pre_softmax=True,
            moe_router_load_balancing_type="none",
            use_cpu_initialization=True,
        )
        router = TopKRouter(config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        router = router.to(device).eval()

        def run(logits: torch.Tensor) -> tuple:
            # routing() expects [seq, batch, experts].
            return router.routing(logits.view(SEQ, BATCH, NUM_EXPERTS))

        return run, "Megatron TopKRouter.routing"
    except Exception as exc:  # noqa: BLE001  (fallback: the same routing function, unwrapped)
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        print(f"TopKRouter unavailable ({exc!r}); timing topk_routing_with_score_function instead")

        def run_fn(logits: torch.Tensor) -> tuple:
            return topk_routing_with_score_function(logits, TOPK, use_pre_softmax=True)

        return run_fn, "topk_routing_with_score_function"


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: cpu 20, cuda 50)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (20 if device.type == "cpu" else 50)
    torch.set_grad_enabled(False)

    stock, stock_name = build_stock_router(device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={repeats} "
          f"T={BATCH}x{SEQ} E={NUM_EXPERTS} (shared {NUM_SHARED}) topk={TOPK} pool~U[{POOL_MIN},{POOL_MAX}]")

    rows = []
    ratios = {}
    for docs in DOCS_PER_SEQ:
        logits, doc_ids, pool_sizes = make_inputs(docs, device)
        emo = lambda: emo_route(logits, doc_ids, pool_sizes, topk=TOPK, num_shared_experts=NUM_SHARED)  # noqa: E731
        loop = lambda: loop_route(logits, doc_ids, pool_sizes)  # noqa: E731
        stock_call = lambda: stock(logits)  # noqa: E731

        # Correctness before timing: the loop must route exactly like emo_route.
        probs, routing_map = emo()
        loop_probs, loop_map = loop()
        mismatched = int((routing_map != loop_map).any(dim=1).sum())
        if mismatched:
            raise SystemExit(f"loop reference disagrees with emo_route on {mismatched} tokens ({docs} docs/seq)")
        torch.testing.assert_close(loop_probs, probs, atol=1e-6, rtol=0)
        stock_probs, stock_map = stock_call()
        assert stock_map.shape == routing_map.shape and int(stock_map.sum()) == routing_map.shape[0] * TOPK

        t_emo = time_ms(emo, device, repeats, args.warmup)
        t_loop = time_ms(loop, device, repeats, args.warmup)
        t_stock = time_ms(stock_call, device, repeats, args.warmup)
        rows += [
            (docs, "emo_route (vectorised)", t_emo),
            (docs, "per-document loop (EMO style)", t_loop),
            (docs, stock_name, t_stock),
        ]
        ratios[docs] = (t_loop / t_emo, t_emo / t_stock)

    print()
    print(f"| docs/seq | contender | median ms | ratio vs emo_route |")
    print(f"|---:|---|---:|---:|")
    emo_by_docs = {d: t for d, name, t in rows if name.startswith("emo_route")}
    for docs, name, t in rows:
        print(f"| {docs} | {name} | {t:.2f} | {t / emo_by_docs[docs]:.2f}x |")
    print()
    for docs, (loop_ratio, stock_ratio) in ratios.items():
        print(f"{docs} docs/seq: loop/emo = {loop_ratio:.2f}x, emo/stock = {stock_ratio:.2f}x")

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
