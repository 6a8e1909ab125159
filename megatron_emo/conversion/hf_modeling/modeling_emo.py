"""EMO mixture-of-experts causal LM for Hugging Face transformers (``EmoForCausalLM``).

Self-contained (imports neither megatron nor megatron_emo): copied next to exported weights and
loaded with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Weight names
and shapes are the published EMO format (emo_spec.md 4.2); routing is the published HF routing
(4.3): no document pools, softmax over the routed experts (the first ``num_experts -
num_shared_experts`` router columns) -> top ``num_experts_per_tok - num_shared_experts``, plus the
shared experts (last columns) through their own softmax (weight exactly 1.0 for one shared
expert). Experts run grouped: the (token, slot) pairs are sorted by expert and each expert that
received tokens runs one matmul over its contiguous block, so the Python loop is over the experts
hit by the batch, never over tokens and never over idle experts. Works with transformers 4.57.x
and 5.x (plain ``torch.nn.functional.scaled_dot_product_attention``, ``DynamicCache``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_emo import EmoConfig


class EmoRMSNorm(nn.Module):
    """RMSNorm computed in fp32, scaled by ``weight``."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.to(torch.float32) * x).to(dtype)


class EmoRotaryEmbedding(nn.Module):
    """Non-interleaved RoPE (rotate-half), ``rope_theta`` base, no scaling."""

    def __init__(self, config: EmoConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)

    @torch.no_grad()
    def forward(self, x, position_ids):
        # Computed on every call, not kept in a buffer: transformers 5.x builds models on the
        # meta device and leaves custom non-persistent buffers uninitialised after loading.
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=x.device).float()
        inv_freq = 1.0 / (self.base ** (exponents / self.dim))
        freqs = position_ids[:, :, None].to(torch.float32) * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Applies RoPE to ``q``/``k`` of shape (B, heads, T, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class EmoAttention(nn.Module):
    """Multi-head / grouped-query attention without biases or QK-norm."""

    def __init__(self, config: EmoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(self, hidden_states, cos, sin, attn_mask, past_key_values=None):
        bsz, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class EmoMLP(nn.Module):
    """One SwiGLU expert: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route_tokens(router_logits, num_experts_per_tok, num_shared_experts, norm_topk_prob=False):
    """Published EMO HF routing: (weights, expert ids), each (tokens, num_experts_per_tok).

    Routed experts: softmax over the first ``E - S`` logits, top ``k - S``. Shared experts: softmax
    over the last ``S`` logits, top ``S``. Routed slots come first, shared slots last.
    """
    num_experts = router_logits.shape[-1]
    logits = router_logits.float()
    if num_shared_experts == 0:
        probs = logits.softmax(dim=-1)
        weights, ids = probs.topk(num_experts_per_tok, dim=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    num_routed = num_experts - num_shared_experts
    k_routed = num_experts_per_tok - num_shared_experts
    routed_w, routed_ids = logits[:, :num_routed].softmax(dim=-1).topk(k_routed, dim=-1)
    shared_w, shared_ids = logits[:, num_routed:].softmax(dim=-1).topk(num_shared_experts, dim=-1)
    weights = torch.cat([routed_w, shared_w], dim=-1)
    ids = torch.cat([routed_ids, shared_ids + num_routed], dim=-1)
    return weights, ids


class EmoSparseMoeBlock(nn.Module):
    """Router (``gate``) plus ``num_experts`` SwiGLU experts, shared experts last.

    With ``config.num_experts_per_layer`` (pruned subsets) layer ``layer_idx`` has its own count.
    """

    def __init__(self, config: EmoConfig, layer_idx: int = 0):
        super().__init__()
        per_layer = getattr(config, "num_experts_per_layer", None)
        self.num_experts = per_layer[layer_idx] if per_layer else config.num_experts
        self.num_shared_experts = config.num_shared_experts
        self.top_k = min(config.num_experts_per_tok, self.num_experts)
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [EmoMLP(config.hidden_size, config.intermediate_size)
             for _ in range(self.num_experts)]
        )

    def forward(self, hidden_states):
        bsz, seq_len, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        router_logits = self.gate(x)
        weights, ids = route_tokens(
            router_logits, self.top_k, self.num_shared_experts, self.norm_topk_prob
        )
        weights = weights.to(x.dtype)
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of_slot = order // self.top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        x_sorted = x[token_of_slot]
        outputs = []
        start = 0
        for expert_idx, count in enumerate(counts):
            if count == 0:
                continue
            outputs.append(self.experts[expert_idx](x_sorted[start : start + count]))
            start += count
        y_sorted = torch.cat(outputs, dim=0) * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, y_sorted)
        return out.reshape(bsz, seq_len, hidden), router_logits


class EmoDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + moe(norm(h))``."""

    def __init__(self, config: EmoConfig, layer_idx: int):
        super().__init__()
        self.pre_attention_layernorm = EmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = EmoAttention(config, layer_idx)
        self.pre_feedforward_layernorm = EmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = EmoSparseMoeBlock(config, layer_idx)

    def forward(self, hidden_states, cos, sin, attn_mask, past_key_values=None):
        h = hidden_states + self.self_attn(
            self.pre_attention_layernorm(hidden_states), cos, sin, attn_mask, past_key_values
        )
        moe_out, router_logits = self.mlp(self.pre_feedforward_layernorm(h))
        return h + moe_out, router_logits


class EmoPreTrainedModel(PreTrainedModel):
    """Base class: config class, init, no-split modules."""

    config_class = EmoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EmoDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, EmoRMSNorm):
            module.weight.data.fill_(1.0)


def _attention_mask_4d(attention_mask, cache_position, kv_len, dtype, device):
    """Additive mask (B or 1, 1, q, kv): causal on absolute positions, plus 2-D padding mask."""
    key_pos = torch.arange(kv_len, device=device)
    allowed = key_pos[None, :] <= cache_position[:, None]  # (q, kv)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].to(torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class EmoModel(EmoPreTrainedModel):
    """Embeddings, decoder layers and final norm."""

    def __init__(self, config: EmoConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [EmoDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = EmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = EmoRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        """Returns the token embedding."""
        return self.embed_tokens

    def set_input_embeddings(self, value):
        """Replaces the token embedding with ``value``."""
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        cache_position=None,
        **kwargs,
    ):
        """Returns a ``MoeModelOutputWithPast``: final hidden states, cache and router logits."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        q_len = inputs_embeds.shape[1]
        if cache_position is None:
            cache_position = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(inputs_embeds.shape[0], -1)
        kv_len = past_len + q_len
        attn_mask = _attention_mask_4d(
            attention_mask, cache_position, kv_len, inputs_embeds.dtype, inputs_embeds.device
        )
        hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        all_hidden = () if output_hidden_states else None
        all_router_logits = ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, router_logits = layer(
                hidden_states, cos, sin, attn_mask, past_key_values if use_cache else None
            )
            all_router_logits += (router_logits,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden,
            router_logits=all_router_logits,
        )


def load_balancing_loss(router_logits, num_experts_per_tok, num_shared_experts, token_mask=None):
    """Switch-style load-balancing loss over the routed (non-shared) experts, layer-averaged.

    ``token_mask`` (B, S) bool selects the tokens that count (``labels != -100``: padding and
    prompt tokens whose labels are masked do not); None counts every token.
    """
    losses = []
    for logits in router_logits:
        num_routed = logits.shape[-1] - num_shared_experts
        k = min(num_experts_per_tok, logits.shape[-1]) - num_shared_experts
        probs = logits[:, :num_routed].float().softmax(dim=-1)
        chosen = F.one_hot(probs.topk(k, dim=-1).indices, num_routed).sum(dim=1).float()
        if token_mask is not None:
            m = token_mask.reshape(-1, 1).to(device=probs.device, dtype=probs.dtype)
            num = m.sum().clamp(min=1.0)
            frac = (chosen * m).sum(0) / (num * k)
            mean_p = (probs * m).sum(0) / num
        else:
            frac, mean_p = chosen.mean(0) / k, probs.mean(0)
        losses.append(num_routed * (frac * mean_p).sum())
    return torch.stack(losses).mean()


class EmoForCausalLM(EmoPreTrainedModel, GenerationMixin):
    """EMO decoder with an untied LM head."""

    def __init__(self, config: EmoConfig):
        super().__init__(config)
        self.model = EmoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        """Returns the token embedding of the decoder."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        """Replaces the decoder's token embedding with ``value``."""
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        """Returns the LM head."""
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        """Replaces the LM head with ``new_embeddings``."""
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        output_router_logits=None,
        cache_position=None,
        logits_to_keep=0,
        num_items_in_batch=None,
        **kwargs,
    ):
        """Causal-LM forward; returns a ``MoeCausalLMOutputWithPast`` (logits, loss with labels).

        With ``labels`` the loss is the token cross-entropy plus the router load-balancing loss
        (``output_router_logits``).

        ``num_items_in_batch`` (passed by ``transformers.Trainer``, which then does not divide
        by the gradient-accumulation steps): the loss is the *sum* of token losses divided by
        it, and the load-balancing term is weighted by this batch's share of those items, so
        that accumulated micro-batches add up to the loss of the whole batch. Without it the
        loss is the mean over tokens with ``labels != -100``.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = aux_loss = None
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            token_mask = labels != -100
            if num_items_in_batch is None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
                aux_weight = 1.0
            else:
                loss = F.cross_entropy(
                    shift_logits, shift_labels, ignore_index=-100, reduction="sum"
                ) / num_items_in_batch
                # Trainer counts items as labels != -100 (unshifted) over all micro-batches.
                aux_weight = token_mask.sum() / num_items_in_batch
            if output_router_logits:
                aux_loss = load_balancing_loss(
                    outputs.router_logits,
                    min(self.config.num_experts_per_tok, self.config.num_experts),
                    self.config.num_shared_experts,
                    token_mask,
                )
                aux_term = self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                loss = loss + aux_term * aux_weight
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits if output_router_logits else None,
        )


__all__ = ["EmoForCausalLM", "EmoModel", "EmoPreTrainedModel"]
