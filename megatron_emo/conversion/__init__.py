"""Checkpoint conversion between Megatron torch_dist checkpoints and the published EMO HF format.

``key_map``, ``hf_config``, ``hf_io`` and ``staging`` are pure torch/json (no megatron);
``checkpoint_io``, ``torch_dist_writer``, ``to_hf`` and ``from_hf`` read and write Megatron
checkpoints, streaming and without a process group, model-parallel state or CUDA.
"""
