"""Megatron <-> HF conversion on tiny EMO models.

One gloo rank; the CPU backend where a test builds a Megatron model (``megatron_cpu``),
Megatron's process groups alone for checkpoint IO.

* A tiny model trained 3 Adam steps with document pools on, exported to HF: HF logits equal
  Megatron logits with pools off (``emo_routing='standard'``, the published HF routing) to
  <= 1e-4 (fp32), and greedy generation matches; both shared-expert layouts.
* Megatron -> HF -> Megatron and HF -> Megatron -> HF are bit-exact; the imported checkpoint loads
  into a Megatron model through ``dist_checkpointing`` (what ``--load`` does).
* Pruned HF checkpoints (spec 4.4) import and keep their logits.
* Inconsistent inputs are refused with messages naming them; ``--dry-run`` prints the mapping.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_megatron_conversion.py -q``
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.from_hf import import_from_hf
from megatron_emo.conversion.to_hf import export_to_hf

from hf_tiny import TINY, random_hf_state_dict, write_hf_dir
from mcore_tiny import (
    build,
    load_into,
    megatron_greedy,
    megatron_logits,
    save_megatron_checkpoint,
    stored_model_tensors,
    train_few_steps,
)


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def _hf_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _same_dir_files(a, b) -> None:
    files = sorted(f for f in os.listdir(a) if f.endswith((".safetensors", ".json", ".py")))
    assert files == sorted(f for f in os.listdir(b) if f.endswith((".safetensors", ".json", ".py")))
    for f in files:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f


@pytest.mark.usefixtures("megatron_cpu")
@pytest.mark.parametrize("layout", ["router", "mlp"])
def test_trained_model_export_parity_and_round_trip(tmp_path, layout):
    trained = train_few_steps(layout)
    ckpt = str(tmp_path / "mcore")
    save_megatron_checkpoint(trained, ckpt, cio.megatron_args(TINY, layout), iteration=3)
    hf_dir = tmp_path / "hf"
    index = export_to_hf(ckpt, str(hf_dir), max_shard_bytes=30_000)
    assert len(set(index["weight_map"].values())) > 1
    assert index["largest_shard_bytes"] <= 30_000
    cfg = json.load(open(hf_dir / "config.json"))
    assert cfg["num_experts"] == 8 and cfg["num_shared_experts"] == 1
    assert cfg["num_experts_per_tok"] == 3

    # Pools off on the Megatron side = the published HF routing.
    ref = build(layout)
    ref.load_state_dict(trained.state_dict())
    ref.eval()
    hf = _hf_model(hf_dir)
    tokens = torch.randint(2, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    diff = (megatron_logits(ref, tokens) - hf(tokens).logits).abs().max().item()
    print(f"[{layout}] max abs logits diff Megatron vs HF: {diff:.3e}")
    assert diff <= 1e-4
    prompt = tokens[:, :8]
    with torch.no_grad():
        gen = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=1)
    assert torch.equal(gen, megatron_greedy(ref, prompt, 10))

    # Megatron -> HF -> Megatron: bit-exact, and loadable into a Megatron model.
    ckpt2 = str(tmp_path / "mcore2")
    import_from_hf(str(hf_dir), ckpt2, shared_layout=layout)
    a, b = stored_model_tensors(ckpt), stored_model_tensors(ckpt2)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    loaded = load_into(build(layout, seed=99), ckpt2)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items()
               if not k.endswith("_extra_state"))
    # HF -> Megatron -> HF: identical files.
    hf2 = tmp_path / "hf2"
    export_to_hf(ckpt2, str(hf2), max_shard_bytes=30_000)
    _same_dir_files(hf_dir, hf2)


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize("layout", ["router", "mlp"])
def test_hf_to_megatron_to_hf_keeps_shared_router_row(tmp_path, layout):
    sd = random_hf_state_dict(seed=11)
    write_hf_dir(tmp_path / "hf", sd)
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "m"), shared_layout=layout)
    export_to_hf(str(tmp_path / "m"), str(tmp_path / "hf2"), max_shard_bytes=40_000)
    back = _hf_tensors(tmp_path / "hf2")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    _same_dir_files(tmp_path / "hf", tmp_path / "hf2")


@pytest.mark.usefixtures("megatron_cpu")
def test_pruned_checkpoint_imports_with_same_logits(tmp_path):
    full = random_hf_state_dict(seed=5)
    keep = [0, 2, 5, 7]  # three routed experts plus the shared expert 7, as spec 4.4 prunes
    pruned_shape = dataclasses.replace(TINY, num_experts=4, num_experts_per_tok=3)
    pruned = {}
    for name, t in full.items():
        if ".mlp.experts." in name:
            layer_part, rest = name.split(".mlp.experts.")
            j, tail = rest.split(".", 1)
            if int(j) in keep:
                pruned[f"{layer_part}.mlp.experts.{keep.index(int(j))}.{tail}"] = t
        elif name.endswith("mlp.gate.weight"):
            pruned[name] = t[keep]
        else:
            pruned[name] = t
    write_hf_dir(tmp_path / "hf", pruned, pruned_shape)
    json.dump({"experts_kept_per_layer": [keep, keep]}, open(tmp_path / "hf" /
                                                             "pruning_metadata.json", "w"))
    ckpt = str(tmp_path / "m")
    import_from_hf(str(tmp_path / "hf"), ckpt, ep=2, shared_layout="router")
    model = load_into(build("router", shape=pruned_shape), ckpt)
    tokens = torch.randint(2, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    diff = (megatron_logits(model, tokens) - _hf_model(tmp_path / "hf")(tokens).logits).abs().max()
    assert diff <= 1e-4
    export_to_hf(ckpt, str(tmp_path / "hf2"), max_shard_bytes=40_000)
    back = _hf_tensors(tmp_path / "hf2")
    assert back.keys() == pruned.keys() and all(torch.equal(back[k], pruned[k]) for k in pruned)


@pytest.mark.usefixtures("model_parallel")
def test_refuses_inconsistent_inputs(tmp_path):
    sd = random_hf_state_dict(seed=3)
    write_hf_dir(tmp_path / "ok", sd)

    def variant(name, mutate_sd=None, mutate_cfg=None):
        d = tmp_path / name
        s = dict(sd)
        if mutate_sd:
            mutate_sd(s)
        write_hf_dir(d, s)
        if mutate_cfg:
            cfg = json.load(open(d / "config.json"))
            mutate_cfg(cfg)
            json.dump(cfg, open(d / "config.json", "w"))
        return str(d)

    unknown = variant("unknown", lambda s: s.update({"model.layers.0.mlp.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unknown keys.*model.layers.0.mlp.bias"):
        import_from_hf(unknown, str(tmp_path / "x1"))
    missing = variant("missing", lambda s: s.pop("model.layers.1.mlp.experts.4.up_proj.weight"))
    with pytest.raises(ValueError, match="missing keys.*model.layers.1.mlp.experts.4.up_proj"):
        import_from_hf(missing, str(tmp_path / "x2"))
    vocab = variant("vocab", mutate_cfg=lambda c: c.update(vocab_size=256))
    with pytest.raises(ValueError, match="vocab"):
        import_from_hf(vocab, str(tmp_path / "x3"))
    shape = variant("shape", lambda s: s.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    with pytest.raises(ValueError, match="shape mismatch for model.layers.0.self_attn.k_proj"):
        import_from_hf(shape, str(tmp_path / "x4"))
    with pytest.raises(ValueError, match="expert_model_parallel_size 2 does not divide the 7 "
                                         r"Megatron experts per layer \(0 of them padding\)"):
        import_from_hf(str(tmp_path / "ok"), str(tmp_path / "x5"), ep=2, shared_layout="mlp",
                       num_padding_experts=0)
    with pytest.raises(ValueError, match="tensor_model_parallel_size 3 does not divide "
                                         "num_attention_heads=4"):
        import_from_hf(str(tmp_path / "ok"), str(tmp_path / "x6"), tp=3)
    assert not any(os.path.exists(tmp_path / f"x{i}") for i in range(1, 7))

    # Export side: a checkpoint whose args promise more experts than it stores.
    ckpt = str(tmp_path / "m")
    import_from_hf(str(tmp_path / "ok"), ckpt, shared_layout="router")
    from megatron.core import dist_checkpointing

    ckpt_dir = cio.resolve_checkpoint_dir(ckpt)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpt, bad)
    args = common["args"]
    args.num_experts = 16
    torch.save(dict(common, args=args), os.path.join(bad, "release", "common.pt"))
    with pytest.raises(ValueError, match="missing experts"):
        export_to_hf(bad, str(tmp_path / "hfbad"))
    args.num_experts, args.padded_vocab_size = 8, 256
    torch.save(dict(common, args=args), os.path.join(bad, "release", "common.pt"))
    with pytest.raises(ValueError, match="vocab mismatch"):
        export_to_hf(bad, str(tmp_path / "hfbad"))


@pytest.mark.usefixtures("model_parallel")
def test_cli_dry_run_prints_mapping(tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    import convert_checkpoint

    write_hf_dir(tmp_path / "hf", random_hf_state_dict(seed=8))
    convert_checkpoint.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "m"), "--ep", "4"])
    convert_checkpoint.main(["to-hf", str(tmp_path / "m"), str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out")
    # --ep 4, shared_layout auto: SharedExpertMLP + 7 routed + 1 padding expert = 8.
    assert ("train with: --num-experts 8 --moe-ffn-hidden-size 16 "
            "--moe-shared-expert-intermediate-size 16 --emo-num-shared-experts 0 "
            "--moe-router-topk 2 --emo-num-padding-experts 1") in out
    assert ("decoder.layers.1.mlp.experts.local_experts.6.linear_fc1.weight "
            "[decoder.layers.mlp.experts.experts.linear_fc1.weight[1, 6]] --glu--> "
            "model.layers.1.mlp.experts.6.gate_proj.weight, "
            "model.layers.1.mlp.experts.6.up_proj.weight") in out
    assert ("decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight "
            "[decoder.layers.mlp.experts.experts.linear_fc2.weight[1, 7]] --zeros--> "
            "(padding expert, dropped)") in out
    assert ("decoder.layers.1.mlp.shared_experts.linear_fc1.weight "
            "[decoder.layers.mlp.shared_experts.linear_fc1.weight[1]] --glu--> "
            "model.layers.1.mlp.experts.7.gate_proj.weight") in out
    assert "--qkv--> model.layers.0.self_attn.q_proj.weight" in out


@pytest.mark.usefixtures("model_parallel")
def test_bfloat16_import_and_export(tmp_path):
    sd = random_hf_state_dict(seed=12)
    write_hf_dir(tmp_path / "hf", sd)
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "m"), dtype="bfloat16")
    export_to_hf(str(tmp_path / "m"), str(tmp_path / "hf2"))
    back = _hf_tensors(tmp_path / "hf2")
    # Every tensor is stored in bf16, norms included, as a --bf16 run saves its model.
    assert all(torch.equal(back[k], v.to(torch.bfloat16)) for k, v in sd.items())
    assert all(v.dtype == torch.bfloat16 for v in back.values())
    assert json.load(open(tmp_path / "hf2" / "config.json"))["torch_dtype"] == "bfloat16"
    export_to_hf(str(tmp_path / "m"), str(tmp_path / "hf3"), dtype="float32", eos_token_id=7,
                 pad_token_id=9)
    gen_cfg = json.load(open(tmp_path / "hf3" / "generation_config.json"))
    assert (gen_cfg["eos_token_id"], gen_cfg["pad_token_id"]) == (7, 9)
    assert _hf_tensors(tmp_path / "hf3")["lm_head.weight"].dtype == torch.float32


@pytest.mark.usefixtures("megatron_cpu")
def test_export_refuses_unknown_checkpoint_tensors(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    model = build("router")
    ckpt_dir = tmp_path / "m" / "iter_0000001"
    os.makedirs(ckpt_dir)
    stray = ShardedTensor.from_rank_offsets("decoder.layers.mlp.mystery.weight", torch.zeros(3),
                                            replica_id=0)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "stray": stray,
                             "args": cio.megatron_args(TINY, "router"),
                             "checkpoint_version": 3.0, "iteration": 1}, str(ckpt_dir))
    (tmp_path / "m" / cio.TRACKER_FILE).write_text("1")
    with pytest.raises(ValueError, match=r"unknown keys in checkpoint.*mlp\.mystery\.weight"):
        export_to_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
