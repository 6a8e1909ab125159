"""Checkpoint conversion between Megatron torch_dist checkpoints and the published EMO HF format.

``key_map`` and ``hf_config`` and ``hf_io`` are pure torch/json (no megatron); ``checkpoint_io``,
``to_hf`` and ``from_hf`` read and write Megatron checkpoints.
"""
