"""Train an EMO MoE language model with ``megatron.training.pretrain``.

Megatron's own flags keep their meaning; the ``--emo-*`` flags configure the router and
``--cpu`` runs the same loop on CPU with gloo. Run::

    torchrun --nproc-per-node 8 -m megatron_emo.train <Megatron flags> <--emo-* flags>
    python -m megatron_emo.train --cpu --transformer-impl local --clip-grad 0 ...   # CPU smoke

Megatron symbols: ``training.pretrain``, ``training.arguments.parse_and_validate_args``,
``training.argument_utils.pretrain_cfg_container_from_args``, ``core.enums.ModelType``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from megatron_emo.patching import Patch, PatchSet
from megatron_emo.quiet import filter_known_messages

# Megatron's validate_args asks the GPU's compute capability for --moe-grouped-gemm
# (arguments.py:1339); a dry run on a login node checks against a Hopper-class target.
_DRY_RUN_TARGET_GPU = PatchSet(
    [Patch(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0), "arguments.py:1339")]
)


def _init_cpu_distributed(args) -> None:
    """Gloo process group and model-parallel state for ``--cpu``.

    Megatron skips mpu on CPU (``initialize.py:358``) and seeds no RNG tracker
    (``initialize.py:447``). ``main`` has enabled the CPU backend's training patches before
    parsing the flags.
    """
    from megatron_emo.cpu import initialize_model_parallel_cpu

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            "gloo", rank=args.rank, world_size=args.world_size
        )
    initialize_model_parallel_cpu(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    """Parses Megatron + EMO flags, checks them, and runs ``pretrain()``.

    Args:
        argv: command-line arguments without the program name; ``sys.argv[1:]`` when None.
    """
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # Read before parsing: both must act before Megatron imports and validates the flags.
    cpu = "--cpu" in sys.argv[1:]
    if cpu:
        filter_known_messages("cpu")  # before megatron's imports warn about CUDA, TE and apex
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_emo.mcore.specs import transformer_engine_importable
    from megatron_emo.training.arguments import add_emo_args, validate_emo_args
    from megatron_emo.training.compat import (
        load_optimizer_state_across_expert_layouts,
        reset_log_sums_on_window_end,
        use_prebuilt_dataset_helpers,
    )
    from megatron_emo.training.model_provider import emo_config_from_args, model_provider
    from megatron_emo.training.step import EMOTrainingStep, train_valid_test_datasets_provider

    if "--emo-dry-run" in sys.argv and not torch.cuda.is_available():
        _DRY_RUN_TARGET_GPU.apply()
    if cpu:
        # Megatron's argument validation already asks CUDA questions (arguments.py:1414).
        import megatron_emo.cpu as cpu_backend

        cpu_backend.enable(training=True)
    args = parse_and_validate_args(extra_args_provider=add_emo_args)
    # A dry run checks the flags for the target machine, which may have TE where this one has not.
    te_available = transformer_engine_importable()
    validate_emo_args(args, te_available=args.emo_dry_run or te_available)
    te_note = ""
    if args.emo_dry_run and not te_available:
        # TransformerConfig refuses TE-only fusions without TE; check the rest for the target.
        fusions = ("apply_rope_fusion", "moe_permute_fusion")
        switched = [f for f in fusions if getattr(args, f, False)]
        for flag in switched:
            setattr(args, flag, False)
        if switched:
            te_note = f" (TE not importable here: {', '.join(switched)} not checked)"
    config = emo_config_from_args(args)  # EMOTransformerConfig's checks, before any process group
    if args.emo_dry_run:
        print(
            f"megatron_emo.train: arguments OK (dry run): world size {args.world_size}, "
            f"TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} "
            f"EP {args.expert_model_parallel_size} CP {args.context_parallel_size} DP "
            f"{args.data_parallel_size}; {config.num_layers} layers, {config.num_moe_experts} "
            f"experts ({config.emo_num_routed_experts} routed, {config.emo_num_padding_experts} "
            f"padding, {config.emo_num_shared_experts} shared in the router; shared expert MLP "
            f"{config.moe_shared_expert_intermediate_size or 0}), top-{config.moe_router_topk}, "
            f"routing {config.emo_routing}, pools {config.emo_pool_size_min}..."
            f"{config.emo_pool_size_max} (eval {config.emo_pool_size_eval}), "
            f"{args.global_batch_size} x {args.seq_length} tokens per step, "
            f"{args.train_iters} iterations{te_note}"
        )
        return
    use_prebuilt_dataset_helpers()
    load_optimizer_state_across_expert_layouts()
    reset_log_sums_on_window_end()  # resumed runs log the same losses as uninterrupted ones
    if args.cpu:
        _init_cpu_distributed(args)

    step = EMOTrainingStep()
    with warnings.catch_warnings():
        # We pass a model provider on purpose (the EMO spec and CPU classes need it).
        warnings.filterwarnings("ignore", message=".*recommended to use a ModelConfig.*")
        cfg = pretrain_cfg_container_from_args(args)
    try:
        pretrain(
            cfg,
            train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            step.forward_step,
            model_provider=model_provider,
        )
    except SystemExit as stop:
        # Megatron's early exits (--exit-interval, --exit-duration-in-mins, the signal handler
        # of a job at its time limit) leave pretrain() through sys.exit (training.py:4155),
        # every rank at the same iteration: report the last logging step's diagnostics first.
        if stop.code in (None, 0):
            step.flush_routing_metrics()
        raise
    step.flush_routing_metrics()  # the last logging step's diagnostics


if __name__ == "__main__":
    main()
