"""The ``--emo-*`` argparse group and the start-up checks of a training run.

The ``--emo-*`` flags are generated from ``EMOTransformerConfig``'s ``emo_*`` fields, like
Megatron's ``ArgumentGroupFactory``: the flag is the field name with dashes, its ``dest`` the field,
so ``core_transformer_config_from_args(args, EMOTransformerConfig)`` fills them; the default is
the field's, the help its attribute docstring. The checks run right after argument parsing, so
contradictory flags fail before any model is built.

Megatron symbols: the ``args`` namespace of ``megatron.training.arguments.parse_args``
(``transformer_impl``, ``clip_grad``, ``use_distributed_optimizer``, ``bf16``, ``fp16``,
``fp8``, ``num_experts``, ``context_parallel_size``, ``dataloader_inter_document_masking``,
``masked_softmax_fusion``); ``training.argument_utils.ArgumentGroupFactory`` (the approach).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
import warnings
from typing import Any, Literal

from megatron_emo.mcore.config import EMOTransformerConfig
from megatron_emo.training.compat import escape_bare_percent_in_help

__all__ = ["add_emo_args", "config_flags", "validate_emo_args"]

_PREFIX = "emo_"


def _field_docstrings(config_cls: type) -> dict[str, str]:
    """Attribute docstrings of the ``emo_*`` fields of ``config_cls`` and its bases.

    Whitespace is collapsed and RST literal quotes are dropped; a subclass's docstring wins.
    """
    docs: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        if not any(n.startswith(_PREFIX) for n in cls.__dict__.get("__annotations__", {})):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, doc in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                text = " ".join(inspect.cleandoc(doc.value.value).split())
                docs[node.target.id] = text.replace("``", "")
    return docs


def config_flags(
    config_cls: type[EMOTransformerConfig] = EMOTransformerConfig,
) -> list[tuple[str, dict[str, Any]]]:
    """The flag of every ``emo_*`` field of ``config_cls``, in field order.

    ``emo_pool_size_min: int = 8`` gives ``--emo-pool-size-min`` (``type=int``); a ``Literal``
    gives ``choices``; a bool defaulting to False gives a ``store_true`` flag, one defaulting to
    True a ``store_false`` flag with ``no-`` after the prefix
    (``emo_scale_aux_loss_by_num_layers`` -> ``--emo-no-scale-aux-loss-by-num-layers``).

    Args:
        config_cls: ``EMOTransformerConfig`` or a subclass.

    Returns:
        ``(flag, add_argument keyword arguments)`` pairs; ``dest`` is the field name, ``default``
        the field default, ``help`` the field's attribute docstring.

    Raises:
        TypeError: for a field without a default or docstring, or of a type argparse cannot take.
    """
    hints = typing.get_type_hints(config_cls)
    docs = _field_docstrings(config_cls)
    flags = []
    for field in dataclasses.fields(config_cls):
        name = field.name
        if not name.startswith(_PREFIX):
            continue
        if field.default is dataclasses.MISSING or name not in docs:
            raise TypeError(f"{config_cls.__name__}.{name} needs a default and an attribute "
                            "docstring (its flag's default and help)")
        kwargs: dict[str, Any] = {"dest": name, "default": field.default, "help": docs[name]}
        flag = "--" + name.replace("_", "-")
        hint = hints[name]
        if hint is bool:
            kwargs["action"] = "store_false" if field.default else "store_true"
            if field.default:
                flag = "--emo-no-" + name.removeprefix(_PREFIX).replace("_", "-")
        elif typing.get_origin(hint) is Literal:
            choices = list(typing.get_args(hint))
            kwargs.update(type=type(choices[0]), choices=choices)
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:
            raise TypeError(f"{config_cls.__name__}.{name}: no flag for type {hint}")
        flags.append((flag, kwargs))
    return flags


def add_emo_args(
    parser: argparse.ArgumentParser,
    *,
    config_cls: type[EMOTransformerConfig] = EMOTransformerConfig,
) -> argparse.ArgumentParser:
    """Adds the ``--emo-*`` group and ``--cpu`` (Megatron's ``extra_args_provider``).

    Args:
        parser: Megatron's argument parser.
        config_cls: the config whose ``emo_*`` fields become flags (see ``config_flags``).

    Returns:
        ``parser``.
    """
    group = parser.add_argument_group(title="EMO document-pool routing")
    for flag, kwargs in config_flags(config_cls):
        group.add_argument(flag, **kwargs)
    # Run options, not model config: no EMOTransformerConfig field.
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
    """Refuses a warm-up that does not end before the decay.

    Megatron only meets it with a bare ``assert self.lr_warmup_steps < self.lr_decay_steps``
    after building the model and optimizer (``core/optimizer_param_scheduler.py:160``; steps
    from ``training.py:1911-1922``). Iteration-based training only (sample-based runs keep
    Megatron's check).
    """
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
            problems.append(
                f"--transformer-impl {impl} (use local: Transformer Engine is GPU-only)"
            )
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
