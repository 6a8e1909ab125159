"""The ``--emo-*`` argparse group and the start-up checks of a training run.

Flags are spelled ``--emo-pool-size-min`` and their ``dest`` equals the ``EMOTransformerConfig``
field, so ``core_transformer_config_from_args(args, EMOTransformerConfig)`` fills them. The
checks run right after argument parsing, so contradictory flags fail before any model is built.

Megatron symbols: the ``args`` namespace of ``megatron.training.arguments.parse_args``
(``transformer_impl``, ``clip_grad``, ``use_distributed_optimizer``, ``bf16``, ``fp16``,
``fp8``, ``num_experts``, ``context_parallel_size``, ``dataloader_inter_document_masking``,
``masked_softmax_fusion``).
"""

from __future__ import annotations

import argparse
import warnings

from megatron_emo.training.compat import escape_bare_percent_in_help

__all__ = ["add_emo_args", "validate_emo_args"]


def add_emo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``--emo-*`` group and ``--cpu`` (Megatron's ``extra_args_provider``).

    Args:
        parser: Megatron's argument parser.

    Returns:
        ``parser``.
    """
    group = parser.add_argument_group(title="EMO document-pool routing")
    group.add_argument(
        "--emo-routing", choices=["emo", "standard"], default="emo", dest="emo_routing",
        help="'emo': every token routes inside its document's expert pool; 'standard': the "
        "same router without pools (the standard-MoE baseline).",
    )
    group.add_argument(
        "--emo-pool-size-min", type=int, default=8, dest="emo_pool_size_min",
        help="Smallest pool size (routed experts) drawn per document in training.",
    )
    group.add_argument(
        "--emo-pool-size-max", type=int, default=128, dest="emo_pool_size_max",
        help="Largest pool size drawn per document in training (inclusive).",
    )
    group.add_argument(
        "--emo-pool-size-eval", type=int, default=32, dest="emo_pool_size_eval",
        help="Pool size of every document in evaluation.",
    )
    group.add_argument(
        "--emo-num-shared-experts", type=int, default=0, dest="emo_num_shared_experts",
        help="Always-on experts in the router's last columns (weight 1.0); counted in "
        "--num-experts and --moe-router-topk. At EP > 1 they overload one expert-parallel "
        "rank: use --moe-shared-expert-intermediate-size with --emo-num-padding-experts instead.",
    )
    group.add_argument(
        "--emo-num-padding-experts", type=int, default=0, dest="emo_num_padding_experts",
        help="Never-routed experts after the routed ones (before any in-router shared expert), "
        "counted in --num-experts, so that it divides --expert-model-parallel-size: (-R) mod EP "
        "for R routed experts. They get no tokens, no gradient and no place in pools, losses or "
        "metrics. EMO 1B14B at EP 8: 127 routed + 1 padding with "
        "--moe-shared-expert-intermediate-size 1024.",
    )
    group.add_argument(
        "--emo-pool-size-seed", type=int, default=12536, dest="emo_pool_size_seed",
        help="Seed of the counter-based pool-size draw (seed, iteration, layer, document).",
    )
    group.add_argument(
        "--emo-renormalize-probs", action="store_true", dest="emo_renormalize_probs",
        help="Renormalise the chosen routed weights to sum to 1 (EMO does not).",
    )
    group.add_argument(
        "--emo-lb-accumulate-microbatches", action="store_true",
        dest="emo_lb_accumulate_microbatches",
        help="Balance over the micro-batches of the step seen so far, not each one alone.",
    )
    group.add_argument(
        "--emo-router-fusion", choices=["auto", "on", "off"], default="auto",
        dest="emo_router_fusion",
        help="Fused Triton EMO routing: 'auto' on CUDA when triton imports (softmax scoring, no "
        "expert bias), 'on' to require it, 'off' for the pure-torch path.",
    )
    group.add_argument(
        "--emo-no-scale-aux-loss-by-num-layers", action="store_false",
        dest="emo_scale_aux_loss_by_num_layers",
        help="Apply --moe-aux-loss-coeff/--moe-z-loss-coeff per layer instead of splitting "
        "them over the MoE layers.",
    )
    group.add_argument(
        "--emo-log-routing-metrics", action=argparse.BooleanOptionalAction, default=True,
        dest="emo_log_routing_metrics",
        help="Log pool sizes, experts per document, document routing entropy, expert load and "
        "the in-pool fraction to TensorBoard at --log-interval.",
    )
    group.add_argument(
        "--emo-dry-run", action="store_true", dest="emo_dry_run",
        help="Parse and check all flags (Megatron's and EMO's, the model config included), print "
        "a summary and exit without touching devices or data (set WORLD_SIZE to the job's size).",
    )
    group.add_argument(
        "--cpu", action="store_true", dest="cpu",
        help="Run on CPU with gloo (smoke runs, debugging); needs --transformer-impl local, "
        "--clip-grad 0 and fp32.",
    )
    escape_bare_percent_in_help(parser)  # megatron-core 0.19.2's own --help crashes otherwise
    return parser


def _check_lr_schedule(args: argparse.Namespace) -> None:
    """Refuses a warm-up that does not end before the decay, which Megatron only meets with a
    bare ``assert self.lr_warmup_steps < self.lr_decay_steps`` after building the model and
    optimizer (``core/optimizer_param_scheduler.py:160``; steps from ``training.py:1911-1922``).
    Iteration-based training only (sample-based runs keep Megatron's check)."""
    if not getattr(args, "train_iters", None):
        return
    decay = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
    source = "--lr-decay-iters" if args.lr_decay_iters is not None else "--train-iters"
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
        flag = f"--lr-warmup-fraction {args.lr_warmup_fraction}"
    else:
        warmup, flag = args.lr_warmup_iters, f"--lr-warmup-iters {args.lr_warmup_iters}"
    if decay <= 0 or warmup >= decay:
        raise ValueError(f"{flag} gives {warmup:g} warm-up iterations, which must be fewer "
                         f"than the {decay} decay iterations ({source} {decay}): lower the "
                         "warm-up or train longer")


def validate_emo_args(args: argparse.Namespace, *, te_available: bool) -> None:
    """Refuses contradictory flags at start-up, naming them.

    Args:
        args: parsed Megatron + EMO arguments.
        te_available: whether ``transformer_engine`` imports on this machine.

    Raises:
        ValueError: for a contradiction or something that cannot work on this machine.

    Model-level contradictions (shared experts vs top-k, pool bounds, router fusion, MTP,
    recompute, ...) are ``EMOTransformerConfig``'s checks, which the entry point runs right after.
    """
    if not args.num_experts:
        raise ValueError(f"EMO trains an MoE model: pass --num-experts (got {args.num_experts})")
    impl = getattr(args, "transformer_impl", "transformer_engine")
    if args.cpu:
        problems = []
        if impl != "local":
            problems.append(f"--transformer-impl {impl} (use local: Transformer Engine is GPU-only)")
        if args.clip_grad and args.clip_grad > 0:
            problems.append(
                f"--clip-grad {args.clip_grad} (pass --clip-grad 0: megatron's clip_grads.py:174 "
                "accepts CUDA tensors only)"
            )
        if args.bf16 or args.fp16:
            problems.append("--bf16/--fp16 (the mixed-precision optimizer is CUDA-only)")
        if getattr(args, "fp8", None):
            problems.append(f"--fp8-format {args.fp8} (FP8 needs Transformer Engine on a GPU)")
        if getattr(args, "moe_grouped_gemm", False):
            problems.append("--moe-grouped-gemm (grouped GEMM experts need Transformer Engine)")
        if args.context_parallel_size > 1:
            problems.append(
                f"--context-parallel-size {args.context_parallel_size} (context parallel "
                "attention needs Transformer Engine)"
            )
        if problems:
            raise ValueError("--cpu cannot run with: " + "; ".join(problems))
    elif impl == "transformer_engine" and not te_available:
        raise ValueError(
            "--transformer-impl transformer_engine but transformer_engine does not import here; "
            "install it (the NVIDIA PyTorch container ships it) or pass --transformer-impl local"
        )
    if getattr(args, "fp8", None) and impl != "transformer_engine":
        raise ValueError(f"--fp8-format {args.fp8} needs --transformer-impl transformer_engine")
    _check_lr_schedule(args)
    if args.dataloader_inter_document_masking:
        if args.context_parallel_size > 1:
            raise ValueError(
                "--dataloader-inter-document-masking with --context-parallel-size "
                f"{args.context_parallel_size} is not supported yet: drop one of them"
            )
        if impl == "local" and args.masked_softmax_fusion and not args.cpu:
            raise ValueError(
                "--dataloader-inter-document-masking with --transformer-impl local needs "
                "--no-masked-softmax-fusion (the fused causal kernel ignores the document mask)"
            )
    elif args.emo_routing == "emo":
        warnings.warn(
            "without --dataloader-inter-document-masking attention crosses document boundaries "
            "while routing pools are per document; EMO trains with both per document",
            stacklevel=2,
        )
