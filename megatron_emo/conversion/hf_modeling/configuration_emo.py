"""EMO model configuration for Hugging Face transformers (``model_type: "emo"``).

Self-contained: copied next to exported weights and loaded with ``trust_remote_code=True``.
Fields follow the published EMO format (emo_spec.md 4.1). Works with transformers 4.57.x and 5.x.
"""

from transformers import PretrainedConfig


class EmoConfig(PretrainedConfig):
    """Configuration of ``EmoForCausalLM``: pre-norm MoE decoder, shared experts last."""

    model_type = "emo"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=100277,
        bos_token_id=None,
        eos_token_id=100257,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        num_experts=128,
        num_experts_per_tok=8,
        num_shared_experts=1,
        norm_topk_prob=False,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        always_active_experts=None,
        num_experts_per_layer=None,
        num_shared_experts_per_layer=None,
        dense_intermediate_size=None,
        dense_mlp_bias=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_attention_heads if num_key_value_heads is None else num_key_value_heads
        )
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.norm_topk_prob = norm_topk_prob
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.always_active_experts = always_active_experts
        self.num_experts_per_layer = num_experts_per_layer
        self.num_shared_experts_per_layer = num_shared_experts_per_layer
        self.dense_intermediate_size = dense_intermediate_size
        self.dense_mlp_bias = dense_mlp_bias
        if rope_scaling is not None:
            raise ValueError(f"EmoConfig supports rope_scaling=None only, got {rope_scaling!r}")
        if always_active_experts or num_shared_experts_per_layer:
            raise ValueError(
                "always_active_experts / num_shared_experts_per_layer are not supported by this "
                "EMO modeling code"
            )
        if num_experts_per_layer:
            # Pruned subsets with a different expert count per layer (shared experts last in
            # every layer); each layer routes to min(num_experts_per_tok, its count) experts.
            if len(num_experts_per_layer) != num_hidden_layers:
                raise ValueError(
                    f"num_experts_per_layer has {len(num_experts_per_layer)} entries, "
                    f"num_hidden_layers is {num_hidden_layers}"
                )
            bad = [n for n in num_experts_per_layer if n <= num_shared_experts]
            if bad:
                raise ValueError(
                    f"num_experts_per_layer {list(num_experts_per_layer)} must exceed "
                    f"num_shared_experts ({num_shared_experts}) in every layer"
                )
        if num_shared_experts > 0 and norm_topk_prob:
            raise ValueError("norm_topk_prob is not supported together with shared experts")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


__all__ = ["EmoConfig"]
