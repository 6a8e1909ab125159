"""Hooks into ``megatron.training.pretrain``: flags, model provider, forward step, data, metrics.

Entry point: ``python -m megatron_emo.train`` (``megatron_emo/train.py``).
"""
