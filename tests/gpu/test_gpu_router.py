"""GPU checks of the routing (marker ``gpu``; skipped without CUDA).

The routing math gives the same pools and experts on CUDA as on CPU, and EMORouter inside a bf16
GPTModel on CUDA (local spec, and the Transformer Engine spec when TE is importable) routes exactly
like ``emo_route`` on its logits.

Run on a GPU machine: ``OMP_NUM_THREADS=1 python -m pytest tests/gpu -m gpu -q``
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import SEQ, VOCAB, free_port, tiny_batch, tiny_config

pytestmark = pytest.mark.gpu


def test_routing_math_matches_cpu():
    from megatron_emo.routing import doc_ids_from_eod, emo_route, sample_pool_sizes

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (4, 4096), generator=gen)  # token 0 = EOD, ~2% of positions
    doc_ids, num_docs = doc_ids_from_eod(tokens, eod_id=0)
    keys = torch.arange(int(num_docs.sum())) * 7919
    logits = torch.randn(4 * 4096, 128, generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        pools = sample_pool_sizes(keys.to(device), seed=1, iteration=5, layer=3,
                                  min_size=8, max_size=128)
        probs, routing_map = emo_route(logits.to(device), doc_ids.reshape(-1).to(device), pools,
                                       topk=8)
        results.append((pools.cpu(), probs.cpu(), routing_map.cpu()))
    assert torch.equal(results[0][0], results[1][0])  # integer hash: bit-identical pool sizes
    # Float reductions differ slightly between devices; near-ties could flip, so allow a handful.
    mismatched_tokens = (results[0][2] != results[1][2]).any(dim=1).sum().item()
    assert mismatched_tokens <= 4, mismatched_tokens
    same = (results[0][2] == results[1][2]).all(dim=1)
    torch.testing.assert_close(results[0][1][same], results[1][1][same], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cuda_world():
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_emo.mcore import process_groups

    if not dist.is_initialized():
        dist.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    torch.cuda.set_device(0)
    process_groups.initialize_model_parallel()
    model_parallel_cuda_manual_seed(123)
    yield
    process_groups.destroy_model_parallel()


def _te_available() -> bool:
    from megatron_emo.mcore.specs import transformer_engine_importable

    return transformer_engine_importable()


@pytest.mark.parametrize(
    "use_te",
    [False, pytest.param(True, marks=pytest.mark.skipif(not _te_available(), reason="no TE"))],
    ids=["local-spec", "te-spec"],
)
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"], ids=["allgather", "alltoall"])
def test_gpt_on_cuda_routes_like_emo_route(cuda_world, use_te, dispatcher):
    from megatron.core.transformer.moe import moe_logging

    from megatron_emo.mcore import build_emo_gpt_model, routing_context
    from megatron_emo.routing import emo_route, sample_pool_sizes

    from helpers import capture_router_io

    moe_logging.destroy_moe_metrics_tracker()
    config = tiny_config(
        moe_token_dispatcher_type=dispatcher,
        use_cpu_initialization=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        moe_grouped_gemm=use_te,
        transformer_impl="transformer_engine" if use_te else "local",
    )
    model = build_emo_gpt_model(
        config, vocab_size=VOCAB, max_sequence_length=SEQ, use_transformer_engine=use_te,
        position_embedding_type="rope",
    ).cuda().bfloat16()
    records = capture_router_io(model)
    tokens, position_ids, mask, docs = tiny_batch()
    model.train()
    with routing_context(docs.to("cuda")):
        loss = model(tokens.cuda(), position_ids.cuda(), mask.cuda(), labels=tokens.cuda())
    loss.float().mean().backward()
    for record in records:
        router = record["router"]
        assert record["probs"].dtype == torch.float32
        logits = (record["hidden"].float() @ router.weight.detach().float().t()).reshape(-1, 8)
        pools = sample_pool_sizes(
            docs.doc_keys.cuda(), seed=config.emo_pool_size_seed, iteration=docs.iteration,
            layer=router.layer_number, min_size=config.emo_pool_size_min,
            max_size=config.emo_pool_size_max,
        )
        probs, routing_map = emo_route(logits, docs.doc_ids.cuda().t().reshape(-1), pools, topk=3)
        assert torch.equal(record["routing_map"], routing_map)
        torch.testing.assert_close(record["probs"], probs, atol=1e-5, rtol=1e-5)
        assert router.weight.grad is not None
