"""Router latency: EMO routing implementations against each other and Megatron's ``TopKRouter``.

Contenders, all on the same inputs (T = 4 x 4096 tokens, E = 127 + 1 shared or 511 + 1, top-8,
pool sizes U[8, E - 1] from ``sample_pool_sizes``, 10 / 100 / 400 documents per sequence of
random lengths), forward and forward + backward (``(probs * g).sum()``, logits requiring grad;
no aux losses anywhere):

* ``loop``: the reference router's per-document Python loop with host syncs (allenai/EMO);
* ``v2-style``: an OLMo-core v2 style rewrite (per-token document sums gathered back to
  ``(B, S, E)``, a per-token rank mask by argsort of argsort), written from its description;
* ``emo_route``: this package's pure-torch path;
* ``emo_route compiled``: ``torch.compile(emo_route, dynamic=True)`` (``--no-compile`` skips);
* ``fused``: ``megatron_emo.routing.fused`` (Triton; CUDA only);
* ``TopKRouter``: Megatron's stock router (softmax top-8 over all experts, no pools), and
  ``TopKRouter fused`` with ``--moe-router-fusion`` when Transformer Engine imports.

Every EMO contender is checked against ``emo_route`` before it is timed. Timing: contenders run
round-robin, medians of CUDA events on GPU and of the process's CPU time on CPU (``process_time``:
other jobs on a shared machine do not inflate it; run with ``OMP_NUM_THREADS=1``); slow
contenders get fewer repeats. Prints markdown tables and the issue-13 targets.

    python benchmarks/bench_router.py --device cuda                     # GPU table
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_router.py       # CPU table (E = 128)
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_router.py --seq 64 --docs 2 8 \
        --experts 16 64 --repeats 3 --no-compile                       # plumbing check on CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron_emo.routing import emo_route, sample_pool_sizes  # noqa: E402

BATCH = 4
NUM_SHARED, TOPK = 1, 8
POOL_MIN = 8
LOOP = "loop (allenai/EMO style)"
V2 = "v2-style (OLMo-core)"
EMO = "emo_route"
COMPILED = "emo_route compiled"
FUSED = "fused (Triton)"
STOCK = "TopKRouter"
STOCK_FUSED = "TopKRouter fused (TE)"


def make_inputs(
    num_experts: int, docs_per_seq: int, device: torch.device, *, seq: int = 4096, seed: int = 0
) -> dict:
    """Logits ``(T, E)``, dense document ids ``(T,)`` (sequence-major) and pool sizes ``(D,)``."""
    gen = torch.Generator().manual_seed(seed + docs_per_seq + num_experts)
    logits = torch.randn(BATCH * seq, num_experts, generator=gen)
    local_ids = []
    for _ in range(BATCH):
        # Random document lengths: docs_per_seq - 1 distinct cut points inside the window.
        cuts = torch.randperm(seq - 1, generator=gen)[: docs_per_seq - 1] + 1
        starts = torch.zeros(seq, dtype=torch.int64)
        starts[cuts] = 1
        local_ids.append(torch.cumsum(starts, 0))
    local_BS = torch.stack(local_ids)
    offsets_B = torch.arange(BATCH)[:, None] * docs_per_seq
    num_docs = BATCH * docs_per_seq
    pool_sizes = sample_pool_sizes(
        torch.arange(num_docs, dtype=torch.int64) + 1000 * docs_per_seq,
        seed=1234, iteration=1, layer=0, min_size=POOL_MIN, max_size=num_experts - NUM_SHARED,
    )
    return dict(
        logits=logits.to(device),
        doc_ids=(local_BS + offsets_B).reshape(-1).to(device),
        pool_sizes=pool_sizes.to(device),
        # The v2-style layout: per-sequence local ids and (B, docs) pool sizes.
        local_ids_BS=local_BS.to(device),
        pool_sizes_BD=pool_sizes.view(BATCH, docs_per_seq).to(device),
    )


def _append_shared(routed_probs_TR: torch.Tensor, routed_map_TR: torch.Tensor, dtype: torch.dtype):
    ones = torch.ones(routed_probs_TR.shape[0], NUM_SHARED, device=routed_probs_TR.device)
    probs = torch.cat([routed_probs_TR, ones], dim=1).to(dtype)
    return probs, torch.cat([routed_map_TR, ones.bool()], dim=1)


def loop_route(logits: torch.Tensor, doc_ids: torch.Tensor, pool_sizes: torch.Tensor):
    """EMO routing as the reference router does it: a Python loop over documents with host syncs.

    Per document: softmax over the routed logits, sum over its tokens, ``topk`` of the experts to
    discard, masked index-put; then one masked softmax + top-k over all tokens. Documents are
    found on the host (``.tolist()``) and each pool size is read with ``.item()``. The pool
    statistics run under ``no_grad`` (the reference records them in autograd): this favours it.
    """
    num_routed = logits.shape[1] - NUM_SHARED
    routed = logits[:, :num_routed].float()
    # Host copy of the boundaries (the reference copies its EOS positions with .cpu().tolist()).
    change = (doc_ids[1:] != doc_ids[:-1]).nonzero().flatten() + 1
    bounds = [0] + change.tolist() + [doc_ids.shape[0]]
    discard_mask = torch.zeros_like(routed, dtype=torch.bool)
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            doc = int(doc_ids[start].item())
            num_discard = num_routed - int(pool_sizes[doc].item())
            if num_discard <= 0:
                continue
            scores = torch.softmax(routed[start:end], dim=-1).sum(dim=0)
            discard = torch.topk(-scores, num_discard, dim=-1).indices
            discard_mask[start:end, discard] = True
    scores = torch.softmax(routed.masked_fill(discard_mask, float("-inf")), dim=-1)
    top = torch.topk(scores, TOPK - NUM_SHARED, dim=-1)
    probs = torch.zeros_like(scores).scatter(1, top.indices, top.values)
    routing_map = torch.zeros_like(discard_mask).scatter(1, top.indices, True)
    return _append_shared(probs, routing_map, logits.dtype)


def v2_style_route(logits: torch.Tensor, local_ids_BS: torch.Tensor, pool_sizes_BD: torch.Tensor):
    """OLMo-core v2 style: document sums gathered back per token, ranks by argsort of argsort."""
    num_routed = logits.shape[1] - NUM_SHARED
    routed_BSR = logits[:, :num_routed].float().view(BATCH, -1, num_routed)
    with torch.no_grad():
        probs_BSR = torch.softmax(routed_BSR, dim=-1)
        index_BSR = local_ids_BS[:, :, None].expand(-1, -1, num_routed)
        doc_sums_BDR = probs_BSR.new_zeros(BATCH, pool_sizes_BD.shape[1], num_routed)
        doc_sums_BDR.scatter_add_(1, index_BSR, probs_BSR)
        token_sums_BSR = doc_sums_BDR.gather(1, index_BSR)
        ranks_BSR = torch.argsort(torch.argsort(token_sums_BSR, dim=-1, descending=True), dim=-1)
        pool_BS = pool_sizes_BD.gather(1, local_ids_BS)
        in_pool_BSR = ranks_BSR < pool_BS[:, :, None]
    scores_BSR = torch.softmax(routed_BSR.masked_fill(~in_pool_BSR, float("-inf")), dim=-1)
    top = torch.topk(scores_BSR, TOPK - NUM_SHARED, dim=-1)
    probs = torch.zeros_like(scores_BSR).scatter(2, top.indices, top.values)
    routing_map = torch.zeros_like(in_pool_BSR).scatter(2, top.indices, True)
    probs_TR, routing_map_TR = probs.view(-1, num_routed), routing_map.view(-1, num_routed)
    return _append_shared(probs_TR, routing_map_TR, logits.dtype)


def build_stock_routers(num_experts: int, device: torch.device) -> dict[str, Callable]:
    """Megatron's TopKRouter (softmax top-8, no aux loss) and, if TE imports, its fused variant."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_emo.mcore.process_groups import initialize_model_parallel
    from megatron_emo.mcore.specs import transformer_engine_importable

    if not dist.is_initialized():
        with socket.socket() as sock:  # a free port: other jobs may share the machine
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        initialize_model_parallel()
    variants = {STOCK: False}
    if transformer_engine_importable():
        variants[STOCK_FUSED] = True
    routers = {}
    for name, fusion in variants.items():
        config = TransformerConfig(
            num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=num_experts,
            moe_router_topk=TOPK, moe_router_pre_softmax=True, moe_router_fusion=fusion,
            moe_router_load_balancing_type="none", use_cpu_initialization=True,
        )
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        router = TopKRouter(config, pg_collection=pgs).to(device).eval()
        # routing() takes [seq, batch, experts].
        routers[name] = lambda x, r=router: r.routing(x.view(-1, BATCH, num_experts))
    return routers


def contenders(inputs: dict, device: torch.device, stock: dict, compiled, use_fused: bool) -> dict:
    """Each contender by name: ``fn(logits) -> (probs, routing_map)``."""
    doc_ids, pool_sizes = inputs["doc_ids"], inputs["pool_sizes"]
    found = {
        LOOP: lambda x: loop_route(x, doc_ids, pool_sizes),
        V2: lambda x: v2_style_route(x, inputs["local_ids_BS"], inputs["pool_sizes_BD"]),
        EMO: lambda x: emo_route(x, doc_ids, pool_sizes, topk=TOPK, num_shared_experts=NUM_SHARED),
    }
    if compiled is not None:
        found[COMPILED] = lambda x: compiled(
            x, doc_ids, pool_sizes, topk=TOPK, num_shared_experts=NUM_SHARED
        )
    if use_fused:
        from megatron_emo.routing.fused import fused_emo_route

        found[FUSED] = lambda x: fused_emo_route(
            x, doc_ids, pool_sizes, topk=TOPK, num_shared_experts=NUM_SHARED
        )
    found.update(stock)
    return found


def check_against_emo_route(fns: dict, logits: torch.Tensor) -> dict[str, int]:
    """Tokens whose routing differs from ``emo_route`` (must be 0 bar GPU near-ties)."""
    with torch.no_grad():
        probs, routing_map = fns[EMO](logits)
        mismatches = {}
        for name, fn in fns.items():
            if name in (EMO, STOCK, STOCK_FUSED):
                continue
            got_probs, got_map = fn(logits)
            same = (got_map == routing_map).all(dim=1)
            mismatches[name] = int((~same).sum())
            torch.testing.assert_close(got_probs[same], probs[same], atol=1e-6, rtol=0)
        stock_probs, stock_map = fns[STOCK](logits)
        assert int(stock_map.sum()) == routing_map.shape[0] * TOPK
    return mismatches


def time_round_robin(
    fns: dict, logits: torch.Tensor, device: torch.device, repeats: int, backward: bool
) -> dict[str, float]:
    """Median ms per contender; one call each per round so load changes hit all alike."""
    grad = torch.randn_like(logits)
    x = logits.detach().clone().requires_grad_()

    def call(fn) -> None:
        probs, _ = fn(x)
        if backward:
            torch.autograd.backward(probs, grad)
            x.grad = None

    # Warm-up (compilation, caches) and a first timing that sets each contender's repeat count.
    budget_ms = 4000.0 if device.type == "cpu" else 1500.0
    caps = {}
    for name, fn in fns.items():
        call(fn)
        t0 = time.perf_counter()
        call(fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        caps[name] = max(3, min(repeats, int(budget_ms / max(first_ms, 1e-3))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(repeats):
        for name, fn in fns.items():
            if round_index >= caps[name]:
                continue
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                call(fn)
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                # CPU time of this process: immune to other jobs on a shared machine.
                t0 = time.process_time()
                call(fn)
                samples[name].append((time.process_time() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                if row.startswith("model name"):
                    return f"'{row.split(':', 1)[1].strip()}' x{os.cpu_count()}"
    except OSError:
        pass
    return platform.machine()


def describe(device: torch.device) -> str:
    import megatron.core

    parts = [
        f"device={device}",
        f"torch={torch.__version__}",
        f"megatron-core={megatron.core.__version__}",
        f"threads={torch.get_num_threads()}",
        f"python={platform.python_version()}",
    ]
    if device.type == "cuda":
        parts.insert(1, torch.cuda.get_device_name(device))
        parts.append(f"cuda={torch.version.cuda}")
    else:
        parts.insert(1, _cpu_name())
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except ImportError:
        parts.append("triton=none")
    from megatron_emo.mcore.specs import transformer_engine_importable

    if transformer_engine_importable():
        import transformer_engine

        parts.append(f"transformer_engine={transformer_engine.__version__}")
    else:
        parts.append("transformer_engine=none")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--experts", type=int, nargs="+", default=None,
                        help="E including the shared expert (default: cuda 128 512, cpu 128)")
    parser.add_argument("--docs", type=int, nargs="+", default=[10, 100, 400])
    parser.add_argument("--repeats", type=int, default=None, help="cpu 15, cuda 50")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(emo_route)")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence (4 sequences)")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (15 if device.type == "cpu" else 50)
    experts = args.experts or ([128, 512] if device.type == "cuda" else [128])
    use_fused = device.type == "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Plumbing check of the fused contender on CPU (interpreter timings mean nothing).
        from megatron_emo.routing.fused import fused_routing_available

        use_fused = fused_routing_available(device)
    compiled = None if args.no_compile else torch.compile(emo_route, dynamic=True)
    modes = ["fwd"] + ([] if args.no_backward else ["fwd+bwd"])
    print(describe(device))
    print(f"T={BATCH}x{args.seq} shared={NUM_SHARED} topk={TOPK} pool~U[{POOL_MIN}, E-1] "
          f"repeats<={repeats}\n")

    results: dict[tuple[int, int, str], dict[str, float]] = {}
    for num_experts in experts:
        stock = build_stock_routers(num_experts, device)
        for docs in args.docs:
            inputs = make_inputs(num_experts, docs, device, seq=args.seq)
            fns = contenders(inputs, device, stock, compiled, use_fused)
            mismatches = check_against_emo_route(fns, inputs["logits"])
            bad = {k: v for k, v in mismatches.items() if v}
            if bad:
                print(f"E={num_experts} docs/seq={docs}: tokens routed unlike emo_route: {bad}")
            if any(v > 16 for v in bad.values()):
                raise SystemExit("routing differs from emo_route beyond near-ties")
            for mode in modes:
                results[(num_experts, docs, mode)] = time_round_robin(
                    fns, inputs["logits"], device, repeats, backward=mode == "fwd+bwd"
                )

    names = list(next(iter(results.values())))
    for num_experts in experts:
        print(f"\nE = {num_experts} ({num_experts - NUM_SHARED} routed + {NUM_SHARED} shared), "
              "median ms (ratio to TopKRouter)\n")
        print("| docs/seq | contender | " + " | ".join(modes) + " |")
        print("|---:|---|" + "---:|" * len(modes))
        for docs in args.docs:
            for name in names:
                cells = []
                for mode in modes:
                    row = results[(num_experts, docs, mode)]
                    cells.append(f"{row[name]:.3f} ({row[name] / row[STOCK]:.2f}x)")
                print(f"| {docs} | {name} | " + " | ".join(cells) + " |")
    print_targets(results, device, experts, args.docs, modes)

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def print_targets(results: dict, device: torch.device, experts, docs_list, modes) -> None:
    """The issue-13 targets, each with its measured ratio and MET / MISSED."""
    print("\nTargets (issue 13):")

    def line(text: str, value: float, ok: bool) -> None:
        print(f"  {text}: {value:.2f}x {'MET' if ok else 'MISSED'}")

    for (num_experts, docs, mode), row in results.items():
        tag = f"E={num_experts} docs/seq={docs} {mode}"
        if FUSED not in row:
            if num_experts == 128 and docs in (10, 400):
                need = 1.0 if docs == 10 else 2.0
                line(f"{tag}: loop / emo_route >= {need:.0f}x", row[LOOP] / row[EMO],
                     row[LOOP] / row[EMO] >= need)
            continue
        fused = row[FUSED]
        line(f"{tag}: fused / TopKRouter <= 1.15x", fused / row[STOCK], fused <= 1.15 * row[STOCK])
        if STOCK_FUSED in row:
            line(f"{tag}: fused / TopKRouter fused <= 1.5x", fused / row[STOCK_FUSED],
                 fused <= 1.5 * row[STOCK_FUSED])
        if docs == 10:
            line(f"{tag}: loop / fused >= 20x", row[LOOP] / fused, row[LOOP] >= 20 * fused)
        line(f"{tag}: v2-style / fused > 1x", row[V2] / fused, row[V2] > fused)
        if COMPILED in row:
            print(f"  {tag}: emo_route compiled / fused = {row[COMPILED] / fused:.2f}x")


if __name__ == "__main__":
    main()
