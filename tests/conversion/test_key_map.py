"""Layout-level checks of the declarative key map on fake state dicts (no megatron import).

For a 128-expert EMO config every HF name and shape of emo_spec.md 4.2 is produced, nothing is
missing and nothing extra, in both shared-expert layouts; HF -> Megatron -> HF and Megatron -> HF
-> Megatron are bit-exact; the fused QKV split follows Megatron's per-group [q.., k, v] layout.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_key_map.py -q``
"""

from __future__ import annotations

import pytest
import torch

from megatron_emo.conversion.hf_config import EmoShape, hf_config_dict, shape_from_hf_config
from megatron_emo.conversion.key_map import (
    MCORE_ALIASES,
    expand_mappings,
    hf_shapes,
    mcore_shape,
    to_hf_tensors,
    to_mcore_tensor,
)

EMO_1B14B = EmoShape(num_layers=16, hidden_size=2048, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=128, intermediate_size=1024, num_experts=128,
                     num_shared_experts=1, num_experts_per_tok=8, vocab_size=100352)
SMALL_GQA = EmoShape(num_layers=2, hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=2, intermediate_size=4, num_experts=128, num_shared_experts=1,
                     num_experts_per_tok=8, vocab_size=16)


def test_spec_names_and_shapes_for_128_experts():
    shapes = hf_shapes(EMO_1B14B)
    assert shapes["model.embed_tokens.weight"] == (100352, 2048)
    assert shapes["lm_head.weight"] == (100352, 2048)
    assert shapes["model.norm.weight"] == (2048,)
    assert shapes["model.layers.15.self_attn.q_proj.weight"] == (2048, 2048)
    assert shapes["model.layers.15.mlp.gate.weight"] == (128, 2048)
    assert shapes["model.layers.3.mlp.experts.127.gate_proj.weight"] == (1024, 2048)
    assert shapes["model.layers.3.mlp.experts.127.down_proj.weight"] == (2048, 1024)
    assert "model.layers.3.mlp.experts.128.up_proj.weight" not in shapes
    assert len(shapes) == 3 + 16 * (7 + 128 * 3)


@pytest.mark.parametrize("layout", ["router", "mlp"])
def test_mapping_covers_every_hf_name_exactly_once(layout):
    names = [h for m in expand_mappings(EMO_1B14B, layout) for h in m.hf]
    assert len(names) == len(set(names))
    assert set(names) == set(hf_shapes(EMO_1B14B))


@pytest.mark.parametrize("layout", ["router", "mlp"])
def test_fake_state_dict_round_trips_both_ways(layout):
    gen = torch.Generator().manual_seed(0)
    mappings = expand_mappings(SMALL_GQA, layout)
    mcore = {m.mcore: torch.randn(mcore_shape(m, SMALL_GQA), generator=gen) for m in mappings}
    rows = {layer: torch.randn(8, generator=gen) for layer in range(2)}
    hf = {}
    for m in mappings:
        hf.update(to_hf_tensors(m, mcore[m.mcore], SMALL_GQA, rows.get(m.layer)))
    assert {k: tuple(v.shape) for k, v in hf.items()} == hf_shapes(SMALL_GQA)
    back_rows = {}
    for m in mappings:
        t, row = to_mcore_tensor(m, hf, SMALL_GQA)
        assert torch.equal(t, mcore[m.mcore]), m.mcore
        if row is not None:
            back_rows[m.layer] = row
    if layout == "mlp":
        assert all(torch.equal(back_rows[i], rows[i]) for i in rows)
        assert len([m for m in mappings if "local_experts" in m.mcore]) == 2 * 127 * 2
    # HF -> Megatron -> HF
    hf2 = {}
    for m in mappings:
        t, row = to_mcore_tensor(m, hf, SMALL_GQA)
        hf2.update(to_hf_tensors(m, t, SMALL_GQA, row))
    assert hf2.keys() == hf.keys() and all(torch.equal(hf[k], hf2[k]) for k in hf)


def test_qkv_split_follows_megatron_group_layout():
    # 4 heads in 2 groups, head_dim 2: rows per group are [q_a, q_b, k, v] (2 rows each).
    qkv = torch.arange(16 * 8).reshape(16, 8).float()
    m = next(m for m in expand_mappings(SMALL_GQA) if m.op == "qkv")
    out = to_hf_tensors(m, qkv, SMALL_GQA)
    q, k, v = (out[n] for n in m.hf)
    assert torch.equal(q, torch.cat([qkv[0:4], qkv[8:12]]))
    assert torch.equal(k, torch.cat([qkv[4:6], qkv[12:14]]))
    assert torch.equal(v, torch.cat([qkv[6:8], qkv[14:16]]))


def test_glu_split_is_gate_then_up():
    fc1 = torch.arange(8 * 8).reshape(8, 8).float()
    m = next(m for m in expand_mappings(SMALL_GQA) if m.op == "glu")
    out = to_hf_tensors(m, fc1, SMALL_GQA)
    assert torch.equal(out[m.hf[0]], fc1[:4]) and torch.equal(out[m.hf[1]], fc1[4:])
    assert m.hf[0].endswith("gate_proj.weight") and m.hf[1].endswith("up_proj.weight")


def test_shape_mismatch_and_missing_tensor_are_named():
    m = next(m for m in expand_mappings(SMALL_GQA) if m.op == "glu")
    with pytest.raises(ValueError, match="shape mismatch for decoder.layers.0.mlp.experts"):
        to_hf_tensors(m, torch.zeros(7, 8), SMALL_GQA)
    with pytest.raises(KeyError, match="missing HF tensor model.layers.0.mlp.experts.0.up_proj"):
        to_mcore_tensor(m, {m.hf[0]: torch.zeros(4, 8)}, SMALL_GQA)


def test_config_json_has_every_spec_field_and_reads_back():
    cfg = hf_config_dict(EMO_1B14B)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "hidden_act",
                "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
                "attention_bias", "num_experts", "num_experts_per_tok", "num_shared_experts",
                "norm_topk_prob", "output_router_logits", "router_aux_loss_coef",
                "tie_word_embeddings", "pad_token_id", "eos_token_id", "bos_token_id",
                "always_active_experts", "num_experts_per_layer", "num_shared_experts_per_layer",
                "dense_intermediate_size", "dense_mlp_bias"):
        assert key in cfg, key
    assert cfg["model_type"] == "emo" and cfg["architectures"] == ["EmoForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_emo.EmoForCausalLM"
    assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-6
    assert (cfg["pad_token_id"], cfg["eos_token_id"], cfg["bos_token_id"]) == (100277, 100257, None)
    assert shape_from_hf_config(cfg) == EMO_1B14B
    pruned = dict(cfg, num_experts=16, num_experts_per_tok=8)
    assert shape_from_hf_config(pruned).num_routed_experts == 15


def test_te_and_local_norm_spellings_share_storage_and_names():
    from megatron_emo.conversion.checkpoint_io import STORAGE_ALIASES, storage_key, stored_key

    for te, local in MCORE_ALIASES.items():
        assert storage_key(te.format(layer=3)) == storage_key(local.format(layer=3))
    # The TE spec of an MoE layer stores the pre-MLP norm under its own name.
    key = storage_key("decoder.layers.3.pre_mlp_layernorm.weight")[0]
    te_key = "decoder.layers.pre_mlp_layernorm.weight"
    assert STORAGE_ALIASES[key] == te_key
    assert stored_key(key, {te_key: None}) == te_key
    assert stored_key(key, {key: None, te_key: None}) == key
    assert storage_key("decoder.layers.3.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", (3,))
    assert storage_key("decoder.layers.5.mlp.experts.local_experts.100.linear_fc2.weight") == (
        "decoder.layers.mlp.experts.experts.linear_fc2.weight", (5, 100))
