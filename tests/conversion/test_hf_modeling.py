"""The project's EMO HF modeling files, loaded like users do (``trust_remote_code=True``).

Checks: the grouped expert computation equals a slow per-token reference of the published HF
routing (split softmax, routed top-k' + shared weight 1.0); KV-cached greedy generation equals
uncached greedy decoding; pruned configs (num_experts_per_tok > num_experts) load and run; the
loss path works. HF-only: imports neither megatron nor megatron_emo.mcore, so it also runs in a
transformers 5.x venv.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_hf_modeling.py -q``
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_tiny import TINY, random_hf_state_dict, write_hf_dir


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def _slow_moe(block, x):
    """Per token: published routing, then a loop over the chosen experts."""
    num_routed = block.num_experts - block.num_shared_experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = block.gate(x[t])
        p = F.softmax(logits[:num_routed], dim=-1)
        w, ids = p.topk(block.top_k - block.num_shared_experts)
        for wi, e in zip(w, ids, strict=True):
            out[t] += wi * block.experts[int(e)](x[t])
        for s in range(num_routed, block.num_experts):
            out[t] += block.experts[s](x[t])  # softmax over one shared logit = 1.0
    return out


def test_loads_with_trust_remote_code_and_matches_slow_reference(tmp_path):
    sd = random_hf_state_dict()
    write_hf_dir(tmp_path, sd)
    model = _load(tmp_path)
    assert type(model).__name__ == "EmoForCausalLM"
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    block = model.model.layers[0].mlp
    x = torch.randn(3, 7, TINY.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, _ = block(x)
        slow = _slow_moe(block, x.reshape(-1, TINY.hidden_size)).reshape(x.shape)
    assert (fast - slow).abs().max() < 1e-5


def test_cached_generation_equals_uncached_greedy(tmp_path):
    write_hf_dir(tmp_path, random_hf_state_dict(seed=2))
    model = _load(tmp_path)
    prompt = torch.randint(2, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                                eos_token_id=None, pad_token_id=1)
        seq = prompt
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_pruned_config_and_loss(tmp_path):
    pruned = dataclasses.replace(TINY, num_experts=4, num_experts_per_tok=4)
    sd = random_hf_state_dict(pruned, seed=4)
    write_hf_dir(tmp_path, sd, pruned)
    import json

    cfg = json.load(open(tmp_path / "config.json"))
    cfg["num_experts_per_tok"] = 8  # as pruning writes min(8, keep_k) in some tools; clamp here
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    model = _load(tmp_path)
    assert model.model.layers[0].mlp.top_k == 4 and len(model.model.layers[0].mlp.experts) == 4
    ids = torch.randint(2, TINY.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    out = model(ids, labels=ids)
    assert out.loss.isfinite() and out.aux_loss.isfinite()
    out.loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad is not None


def test_left_padded_batch_generates_like_single_prompts(tmp_path):
    write_hf_dir(tmp_path, random_hf_state_dict(seed=6))
    model = _load(tmp_path)
    gen = torch.Generator().manual_seed(7)
    long, short = torch.randint(2, TINY.vocab_size, (1, 9), generator=gen), torch.randint(
        2, TINY.vocab_size, (1, 5), generator=gen)
    batch = torch.cat([long, torch.cat([torch.ones(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kw)
        alone_long = model.generate(long, **kw)
        alone_short = model.generate(short, **kw)
    assert torch.equal(both[0, 9:], alone_long[0, 9:])
    assert torch.equal(both[1, 9:], alone_short[0, 5:])


def test_no_non_persistent_buffers(tmp_path):
    """The modeling code keeps no non-persistent buffers.

    transformers 5.x builds models on the meta device and leaves custom non-persistent buffers
    uninitialised after ``from_pretrained`` (RoPE ``inv_freq`` once held garbage there, making
    routing depend on the load).
    """
    from transformers import AutoModelForCausalLM

    from hf_tiny import random_hf_state_dict, write_hf_dir

    write_hf_dir(tmp_path / "hf", random_hf_state_dict(seed=3))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    persistent = set(model.state_dict())
    stray = [name for name, _ in model.named_buffers() if name not in persistent]
    assert not stray, stray
