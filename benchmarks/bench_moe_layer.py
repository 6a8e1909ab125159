"""One Megatron ``MoELayer`` with ``EMORouter``: forward+backward time, EMO pools vs standard.

1B14B-shaped layer (d 2048, 128 experts = 127 + 1 shared of 1024, top-8, seq 4096, bf16 params,
fp32 router, local spec: SequentialMLP experts unless TE imports), timed with CUDA events
(median), plus the router alone (``router(hidden)`` forward+backward), so the routing overhead is
visible next to the layer it belongs to. On CPU (``--device cpu``) a tiny shape checks the
plumbing through the CPU backend.

    python benchmarks/bench_moe_layer.py                   # GPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_moe_layer.py --device cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

SHAPES = {
    "cuda": dict(
        hidden=2048, experts=128, shared=1, topk=8, ffn=1024, seq=4096, batch=1, docs=(1, 10, 400)
    ),
    "cpu": dict(hidden=64, experts=8, shared=1, topk=3, ffn=64, seq=256, batch=2, docs=(1, 10)),
}


def _init(device: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29547")
    if device == "cpu":
        from megatron_emo.cpu import initialize_model_parallel_cpu

        dist.init_process_group("gloo", rank=0, world_size=1)
        initialize_model_parallel_cpu(seed=1234)
    else:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from megatron_emo.mcore.process_groups import initialize_model_parallel

        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
        initialize_model_parallel()
        model_parallel_cuda_manual_seed(1234)


def build_layer(shape: dict, routing: str, device: str):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_emo.mcore import EMOTransformerConfig, get_emo_layer_spec

    config = EMOTransformerConfig(
        num_layers=1, hidden_size=shape["hidden"],
        num_attention_heads=16 if device == "cuda" else 4,
        num_moe_experts=shape["experts"], moe_ffn_hidden_size=shape["ffn"],
        moe_router_topk=shape["topk"], emo_num_shared_experts=shape["shared"],
        emo_pool_size_min=shape["topk"], emo_pool_size_max=shape["experts"],
        emo_pool_size_eval=min(32, shape["experts"] - shape["shared"]), emo_routing=routing,
        moe_router_dtype="fp32", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=1e-3,
        moe_token_dispatcher_type="alltoall", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        bf16=device == "cuda", params_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        use_cpu_initialization=device == "cpu", bias_activation_fusion=False,
        gradient_accumulation_fusion=False, moe_permute_fusion=False,
    )
    spec = get_emo_layer_spec(config, use_transformer_engine=False)
    moe = spec.layer_specs[0].submodules.mlp(
        config=config, layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    if device == "cpu":
        from megatron_emo.cpu import adapt_model_for_cpu

        adapt_model_for_cpu(moe)
    return moe.to(device)


def documents(shape: dict, docs_per_seq: int, device: str):
    from megatron_emo.routing import DocumentBatch

    seq, batch = shape["seq"], shape["batch"]
    gen = torch.Generator().manual_seed(docs_per_seq)
    rows = []
    for b in range(batch):
        starts = torch.zeros(seq, dtype=torch.int64)
        starts[torch.randperm(seq - 1, generator=gen)[: docs_per_seq - 1] + 1] = 1
        rows.append(torch.cumsum(starts, 0) + b * docs_per_seq)
    doc_ids = torch.stack(rows)
    keys = torch.arange(batch * docs_per_seq) * 7 + 3
    return DocumentBatch(doc_ids, keys, iteration=5).to(device)


def timed(fn, device: str, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = args.device
    shape = SHAPES[device]
    _init(device)
    from megatron_emo.mcore import routing_context

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(shape["seq"], shape["batch"], shape["hidden"], generator=gen)
    hidden = hidden.to(device, dtype)
    rows = []
    for routing in ("standard", "emo"):
        moe = build_layer(shape, routing, device)
        moe.train()
        for docs_per_seq in shape["docs"]:
            docs = documents(shape, docs_per_seq, device)
            x = hidden.clone().requires_grad_(True)

            # Defaults bind this iteration's layer, documents and input to the closures.
            def layer_step(moe=moe, x=x, docs=docs):
                with routing_context(docs):
                    out = moe(x)
                    out = out[0] if isinstance(out, tuple) else out
                out.float().sum().backward()

            def router_step(moe=moe, x=x, docs=docs):
                with routing_context(docs):
                    probs, _ = moe.router(x)
                probs.float().sum().backward()

            rows.append((routing, docs_per_seq, timed(layer_step, device, args.repeats),
                         timed(router_step, device, args.repeats)))
        del moe, layer_step, router_step  # the closures' defaults hold the layer too
        if device == "cuda":
            torch.cuda.empty_cache()
    base = {d: (layer, router) for r, d, layer, router in rows if r == "standard"}
    print(f"\ndevice={device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}) "
          f"torch={torch.__version__} T={shape['batch']}x{shape['seq']} d={shape['hidden']} "
          f"E={shape['experts']} ({shape['shared']} shared) ffn={shape['ffn']} "
          f"top-{shape['topk']}; "
          f"fwd+bwd, median of {args.repeats}\n")
    print("| routing | docs/seq | MoE layer ms | router ms | layer vs standard "
          "| router vs standard |")
    print("|---|---:|---:|---:|---:|---:|")
    for routing, d, layer, router in rows:
        print(f"| {routing} | {d} | {layer:.2f} | {router:.2f} | {layer / base[d][0]:.3f}x | "
              f"{router / base[d][1]:.2f}x |")


if __name__ == "__main__":
    main()
