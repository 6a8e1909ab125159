"""Hooks into ``megatron.training.pretrain``: arguments, model provider, forward step, data, metrics.

Entry point: ``python -m megatron_emo.train`` (``megatron_emo/train.py``).
"""
