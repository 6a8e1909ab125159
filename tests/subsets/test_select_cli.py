"""``tools/select_experts.py`` end to end on tiny EMO checkpoints (CPU backend, 1 gloo rank).

* HF input: selection.json, pruned HF dir (loads with AutoModelForCausalLM) and a Megatron
  torch_dist subset (EP 2) that loads into a Megatron model and trains one optimizer step.
* Megatron input: exported to HF first (logged) and gives the same selection as its HF twin.
* Text examples use the checkpoint's tokenizer; per-layer keep counts skip the Megatron part.
* Bad input is refused with messages naming the values.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/subsets/test_select_cli.py -q``
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import select_experts  # noqa: E402

from megatron_emo.subsets import Selection  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_cpu")


def _write_examples(path, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"tokens": torch.randint(2, 128, (12,), generator=gen).tolist()})
                    + "\n")
    return str(path)


def test_hf_input_writes_pruned_hf_and_trainable_megatron(tmp_path, tiny_hf_dir, capsys):
    from transformers import AutoModelForCausalLM

    from megatron_emo.mcore import routing_context

    from hf_tiny import TINY
    from mcore_tiny import build, load_into, megatron_logits

    ex = _write_examples(tmp_path / "ex.jsonl")
    out = tmp_path / "out"
    select_experts.main([tiny_hf_dir, ex, "--keep", "4", "--output", str(out), "--ep", "2",
                         "--method", "global", "--shared-layout", "router"])
    sel = json.load(open(out / "selection.json"))
    assert Selection.load(str(out / "selection.json")).to_dict() == sel
    assert sel["method"] == "global" and sel["keep_k"] == 4 and sel["num_examples"] == 4
    assert sel["num_tokens"] == 48 and len(sel["examples_sha256"]) == 64
    assert sel["source_checkpoint"] == os.path.abspath(tiny_hf_dir)
    assert all(len(k) == 4 and k[-1] == 7 for k in sel["experts_kept_per_layer"])
    cfg = json.load(open(out / "hf" / "config.json"))
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["num_shared_experts"]) == (4, 3, 1)
    hf = AutoModelForCausalLM.from_pretrained(str(out / "hf"), trust_remote_code=True).eval()

    # The Megatron subset loads and matches the HF subset, then trains one step.
    shape = dataclasses.replace(TINY, num_experts=4)
    model = load_into(build("router", shape=shape, seed=9, emo_routing="emo",
                            emo_pool_size_min=2, emo_pool_size_max=3, emo_pool_size_eval=2),
                      str(out / "megatron"))
    model.eval()
    tokens = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = build("router", shape=shape, seed=1)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (megatron_logits(ref.eval(), tokens) - hf(tokens).logits).abs().max() <= 1e-4
    from helpers import tiny_batch

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("extra_state")}
    tokens, position_ids, mask, docs = tiny_batch(seed=0)
    with routing_context(docs):
        loss = model(tokens, position_ids, mask, labels=torch.roll(tokens, -1, dims=1)).mean()
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert "decoder.layers.0.mlp.router.weight" in changed
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in changed
    assert "wrote Megatron checkpoint" in capsys.readouterr().out


def test_megatron_subset_default_layout_pads_to_ep(tmp_path, tiny_hf_dir, capsys):
    """Default layout: SharedExpertMLP, and 3 kept routed experts + 1 padding expert at EP 2."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from hf_tiny import TINY
    from mcore_tiny import build, load_into

    ex = _write_examples(tmp_path / "ex.jsonl")
    out = tmp_path / "out"
    select_experts.main([tiny_hf_dir, ex, "--keep", "4", "--output", str(out), "--ep", "2",
                         "--method", "global"])
    assert "--emo-num-padding-experts 1" in capsys.readouterr().out
    args = dist_checkpointing.load_common_state_dict(str(out / "megatron" / "release"))["args"]
    assert (args.num_experts, args.emo_num_padding_experts, args.emo_num_shared_experts,
            args.moe_shared_expert_intermediate_size, args.moe_router_topk) == (4, 1, 0, 16, 2)
    hf = {}
    for f in os.listdir(out / "hf"):
        if f.endswith(".safetensors"):
            hf.update(load_file(str(out / "hf" / f)))
    shape = dataclasses.replace(TINY, num_experts=4)
    model = load_into(build("mlp", shape=shape, num_padding=1), str(out / "megatron"))
    for i, layer in enumerate(model.decoder.layers):
        p = f"model.layers.{i}.mlp."
        assert torch.equal(layer.mlp.router.weight[:3], hf[p + "gate.weight"][:3])
        assert not layer.mlp.router.weight[3].any()
        assert not layer.mlp.experts.local_experts[3].linear_fc2.weight.any()
        assert torch.equal(layer.mlp.experts.local_experts[2].linear_fc2.weight,
                           hf[p + "experts.2.down_proj.weight"])
        assert torch.equal(layer.mlp.shared_experts.linear_fc2.weight,
                           hf[p + "experts.3.down_proj.weight"])


def test_megatron_input_is_exported_first_and_selects_the_same(tmp_path, tiny_hf_dir, capsys):
    from megatron_emo.conversion.from_hf import import_from_hf

    import_from_hf(tiny_hf_dir, str(tmp_path / "m"))
    ex = _write_examples(tmp_path / "ex.jsonl", seed=1)
    select_experts.main([str(tmp_path / "m"), ex, "--keep", "3", "--output",
                         str(tmp_path / "a"), "--no-megatron"])
    assert "Megatron torch_dist checkpoint: exporting it to HF" in capsys.readouterr().out
    select_experts.main([tiny_hf_dir, ex, "--keep", "3", "--output", str(tmp_path / "b"),
                         "--no-megatron"])
    a = json.load(open(tmp_path / "a" / "selection.json"))
    b = json.load(open(tmp_path / "b" / "selection.json"))
    assert a["method"] == "greedy-layerwise"
    assert a["experts_kept_per_layer"] == b["experts_kept_per_layer"]
    assert a["extra"]["exported_from_megatron"] and not b["extra"]["exported_from_megatron"]
    assert not os.path.exists(tmp_path / "a" / "megatron")
    # Selecting again inside a subset records the original model's indices too.
    select_experts.main([str(tmp_path / "b" / "hf"), ex, "--keep", "2", "--output",
                         str(tmp_path / "c"), "--no-megatron", "--method", "global"])
    c = json.load(open(tmp_path / "c" / "selection.json"))
    first = b["experts_kept_per_layer"]
    assert c["extra"]["experts_kept_per_layer_original"] == [
        [first[layer][j] for j in kept] for layer, kept in enumerate(c["experts_kept_per_layer"])]
    meta = json.load(open(tmp_path / "c" / "hf" / "pruning_metadata.json"))
    assert meta["experts_kept_per_layer"] == c["extra"]["experts_kept_per_layer_original"]


def _with_tokenizer(src, dst):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(src, dst)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(dst, "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w1"},
              open(os.path.join(dst, "tokenizer_config.json"), "w"))
    return str(dst)


def test_text_examples_and_per_layer_counts(tmp_path, tiny_hf_dir, capsys):
    from transformers import AutoModelForCausalLM

    hf = _with_tokenizer(tiny_hf_dir, tmp_path / "hf_tok")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "w5 w9 w33 w100 w7"}) + "\n")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf)("w5 w9 w33 w100 w7")["input_ids"]
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text(json.dumps({"tokens": ids}) + "\n")
    select_experts.main([hf, str(text), "--keep-per-layer", "3,5", "--output",
                         str(tmp_path / "t")])
    assert "WARNING: per-layer keep counts [3, 5] differ" in capsys.readouterr().out
    select_experts.main([hf, str(tokens), "--keep-per-layer", "3,5", "--output",
                         str(tmp_path / "k")])
    a = json.load(open(tmp_path / "t" / "selection.json"))
    b = json.load(open(tmp_path / "k" / "selection.json"))
    assert a["num_tokens"] == len(ids)
    assert a["experts_kept_per_layer"] == b["experts_kept_per_layer"]
    assert not os.path.exists(tmp_path / "t" / "megatron")
    assert os.path.isfile(tmp_path / "t" / "hf" / "tokenizer.json")
    cfg = json.load(open(tmp_path / "t" / "hf" / "config.json"))
    assert cfg["num_experts_per_layer"] == [3, 5] and cfg["num_experts"] == 5
    meta = json.load(open(tmp_path / "t" / "hf" / "pruning_metadata.json"))
    assert meta["keep_per_layer"] == [3, 5] and meta["num_calibration"] == 1
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "t" / "hf"), trust_remote_code=True)


def test_bad_input_is_refused(tmp_path, tiny_hf_dir):
    ex = _write_examples(tmp_path / "ex.jsonl")
    out = str(tmp_path / "o")

    def run(*args, checkpoint=tiny_hf_dir, examples=ex):
        select_experts.main([checkpoint, examples, "--output", out, *args])

    for k in ("9", "1", "0"):
        with pytest.raises(ValueError, match=rf"keep_k \({k}\) for layer 0 must satisfy "
                                             r"num_shared_experts \(1\) < keep_k <= num_experts "
                                             r"\(8\)"):
            run("--keep", k)
    with pytest.raises(ValueError, match="keep_per_layer has 3 entries, the model has 2 layers"):
        run("--keep-per-layer", "4,4,4")
    with pytest.raises(ValueError, match="expert_model_parallel_size must be >= 1, got 0"):
        run("--keep", "6", "--ep", "0")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="has no records"):
        run("--keep", "4", examples=str(empty))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="has 'text' but the checkpoint .* has no tokenizer"):
        run("--keep", "4", examples=str(text))
    oov = tmp_path / "oov.jsonl"
    oov.write_text(json.dumps({"tokens": [3, 500]}) + "\n")
    with pytest.raises(ValueError, match=r"token ids \[500\] outside the vocabulary \[0, 128\)"):
        run("--keep", "4", examples=str(oov))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an EMO checkpoint: config.json model_type is "
                                         "'llama'"):
        run("--keep", "4", checkpoint=str(llama))
    with pytest.raises(ValueError, match="neither an EMO HF directory"):
        run("--keep", "4", checkpoint=str(tmp_path))
    assert not os.path.exists(out)
