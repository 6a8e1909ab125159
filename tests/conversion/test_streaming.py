"""The streaming converter: same checkpoint as Megatron's own save, padding layouts, staging.

* ``from-hf`` builds no model, yet writes exactly what ``dist_checkpointing.save`` writes for the
  model holding those weights: the same tensor keys, global shapes, dtypes and chunks, the same
  ``_extra_state`` objects and the same values (both shared-expert layouts, with padding).
* HF -> Megatron -> HF is bit-exact with padding experts (SharedExpertMLP layout at EP=2, and the
  in-router layout with explicit padding); padding experts are stored as zeros and dropped.
* ``to-hf`` reads the Transformer Engine MoE spelling of the pre-MLP norm
  (``decoder.layers.pre_mlp_layernorm.weight``), which ``from-hf`` also writes.
* A conversion that fails half-way leaves no output and keeps a previous output intact; a
  directory with other content is refused. A SIGKILLed conversion leaves nothing at the output
  path, and the next one cleans its leftovers (child process).
* With ``torch.cuda.is_available()`` forced to True, CUDA calls poisoned and the CPU backend
  unimportable, both directions still run and leave no process group and no model-parallel
  state (child process): the path GPU nodes take.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_streaming.py -q``
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.from_hf import import_from_hf
from megatron_emo.conversion.to_hf import export_to_hf

from hf_tiny import TINY, random_hf_state_dict, write_hf_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hf_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _dir_bytes(path) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))
            if f.endswith((".safetensors", ".json", ".py"))}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "hf"
    sd = random_hf_state_dict(seed=17)
    write_hf_dir(path, sd)
    return str(path), sd


def _structure(ckpt: str) -> tuple[dict, set]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(cio.resolve_checkpoint_dir(ckpt)).read_metadata()
    tensors = {k: (tuple(v.size), v.properties.dtype,
                   sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
               for k, v in md.state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata)}
    objects = {k for k, v in md.state_dict_metadata.items()
               if not isinstance(v, TensorStorageMetadata)}
    return tensors, objects


@pytest.mark.parametrize("layout,ep", [("router", 1), ("mlp", 2)], ids=["router", "mlp-pad1"])
def test_streamed_checkpoint_equals_megatron_save(tmp_path, megatron_cpu, hf_dir, layout, ep):
    from mcore_tiny import build, load_into, save_megatron_checkpoint, stored_model_tensors

    path, _ = hf_dir
    streamed = str(tmp_path / "streamed")
    import_from_hf(path, streamed, ep=ep, shared_layout=layout)
    padding = 1 if layout == "mlp" else 0
    model = load_into(build(layout, seed=1, num_padding=padding), streamed)
    saved = str(tmp_path / "saved")
    args = cio.megatron_args(TINY, layout, ep=ep, num_padding=padding)
    save_megatron_checkpoint(model, saved, args)
    (t_streamed, o_streamed), (t_saved, o_saved) = _structure(streamed), _structure(saved)
    # from-hf also writes the Transformer Engine MoE spelling of the pre-MLP norm.
    te_norm = "decoder.layers.pre_mlp_layernorm"
    assert {k for k in t_streamed if k not in t_saved} == {te_norm + ".weight"}
    assert {k for k in o_streamed if k not in o_saved} == {
        f"{te_norm}._extra_state/shard_{i}_2" for i in range(2)}
    assert t_streamed[te_norm + ".weight"] == t_saved["decoder.layers.mlp.linear_fc1."
                                                      "layer_norm_weight"]
    assert {k: v for k, v in t_streamed.items() if k in t_saved} == t_saved
    assert o_saved <= o_streamed
    a, b = stored_model_tensors(streamed), stored_model_tensors(saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(os.path.join(streamed, cio.TRACKER_FILE)).read() == "release"


@pytest.mark.parametrize("layout,ep,padding", [("mlp", 2, None), ("router", 1, 2)],
                         ids=["mlp-ep2", "router-pad2"])
def test_padding_round_trip_is_bit_exact(tmp_path, hf_dir, layout, ep, padding, capfd):
    from megatron.core import dist_checkpointing

    path, sd = hf_dir
    ckpt = str(tmp_path / "m")
    import_from_hf(path, ckpt, ep=ep, shared_layout=layout, num_padding_experts=padding,
                   progress=True)
    args = dist_checkpointing.load_common_state_dict(os.path.join(ckpt, "release"))["args"]
    n_pad = args.emo_num_padding_experts
    assert n_pad == (1 if layout == "mlp" else 2)
    assert args.num_experts == 8 - (layout == "mlp") + n_pad
    stored = cio.stored_tensor_keys(os.path.join(ckpt, "release"))
    pad_ids = range(7, 7 + n_pad)
    for e in pad_ids:  # padding experts sit right after the 7 routed ones, as zeros
        t = cio.load_slice(os.path.join(ckpt, "release"),
                           f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight",
                           stored)
        assert not t.any()
    router = cio.load_slice(os.path.join(ckpt, "release"), "decoder.layers.0.mlp.router.weight",
                            stored)
    gate = sd["model.layers.0.mlp.gate.weight"]
    assert torch.equal(router[:7], gate[:7]) and not router[7:7 + n_pad].any()
    if layout == "router":  # the in-router shared expert comes after the padding
        assert torch.equal(router[7 + n_pad], gate[7])
        shared = cio.load_slice(os.path.join(ckpt, "release"), "decoder.layers.0.mlp.experts."
                                f"local_experts.{7 + n_pad}.linear_fc2.weight", stored)
        assert torch.equal(shared, sd["model.layers.0.mlp.experts.7.down_proj.weight"])
    out = tmp_path / "hf2"
    index = export_to_hf(ckpt, str(out), max_shard_bytes=40_000, progress=True)
    assert _dir_bytes(path) == _dir_bytes(out)
    err = capfd.readouterr().err
    assert f"{len(index['weight_map'])}/{len(index['weight_map'])} tensors" in err  # to-hf bar
    assert "from-hf m" in err and "to-hf hf2" in err


def test_export_reads_the_transformer_engine_norm_spelling(tmp_path, hf_dir):
    """A checkpoint with only ``pre_mlp_layernorm.weight`` (TE spec MoE) exports the same."""
    path, _ = hf_dir
    ckpt = tmp_path / "m"
    import_from_hf(path, str(ckpt), shared_layout="router")
    te = tmp_path / "te"
    shutil.copytree(ckpt, te)
    md_path = te / "release" / ".metadata"
    md = pickle.load(open(md_path, "rb"))
    local = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    del md.state_dict_metadata[local]
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != local}
    pickle.dump(md, open(md_path, "wb"))
    assert "decoder.layers.pre_mlp_layernorm.weight" in cio.stored_tensor_keys(str(te / "release"))
    export_to_hf(str(ckpt), str(tmp_path / "a"), max_shard_bytes=40_000)
    export_to_hf(str(te), str(tmp_path / "b"), max_shard_bytes=40_000)
    assert _dir_bytes(tmp_path / "a") == _dir_bytes(tmp_path / "b") == _dir_bytes(path)


def _partials(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".partial-" in n or ".replaced-" in n]


def test_failure_midway_leaves_no_output_and_keeps_the_previous_one(tmp_path, hf_dir,
                                                                    monkeypatch):
    from megatron_emo.conversion import hf_io

    path, sd = hf_dir
    ckpt, hf_out = tmp_path / "m", tmp_path / "hf"
    real_get, calls = hf_io.HFWeights.get, [0]

    def failing_get(self, name):
        calls[0] += 1
        if calls[0] == 20:
            raise OSError("injected read failure")
        return real_get(self, name)

    monkeypatch.setattr(hf_io.HFWeights, "get", failing_get)
    with pytest.raises(OSError, match="injected"):
        import_from_hf(path, str(ckpt))
    assert not ckpt.exists() and _partials(tmp_path) == []
    monkeypatch.setattr(hf_io.HFWeights, "get", real_get)
    import_from_hf(path, str(ckpt))
    previous = _dir_bytes(ckpt / "release")

    # A second import into the same path fails half-way: the complete one stays as it was.
    calls[0] = 0
    monkeypatch.setattr(hf_io.HFWeights, "get", failing_get)
    with pytest.raises(OSError, match="injected"):
        import_from_hf(path, str(ckpt), dtype="bfloat16")
    assert _dir_bytes(ckpt / "release") == previous and _partials(tmp_path) == []
    monkeypatch.setattr(hf_io.HFWeights, "get", real_get)

    from megatron_emo.conversion import to_hf

    real_convert, converts = to_hf.to_hf_tensors, [0]

    def failing_convert(*args):
        converts[0] += 1
        if converts[0] == 20:
            raise OSError("injected checkpoint read failure")
        return real_convert(*args)

    monkeypatch.setattr(to_hf, "to_hf_tensors", failing_convert)
    with pytest.raises(OSError, match="injected checkpoint"):
        export_to_hf(str(ckpt), str(hf_out))
    assert not hf_out.exists() and _partials(tmp_path) == []
    monkeypatch.setattr(to_hf, "to_hf_tensors", real_convert)
    export_to_hf(str(ckpt), str(hf_out))
    assert all(torch.equal(_hf_tensors(hf_out)[k], v) for k, v in sd.items())
    export_to_hf(str(ckpt), str(hf_out), dtype="bfloat16")  # a previous export is replaced
    assert json.load(open(hf_out / "config.json"))["torch_dtype"] == "bfloat16"

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=f"output {other} exists and is not an empty "
                                              "directory or a previous Megatron checkpoint"):
        import_from_hf(path, str(other))
    with pytest.raises(FileExistsError, match="previous HF model directory"):
        export_to_hf(str(ckpt), str(other))
    assert (other / "todo.txt").read_text() == "keep me"


def _child(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                                       os.path.join(REPO, "tests", "conversion")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)


_FORCED_CUDA = r'''
import sys, torch
import torch.distributed as dist
sys.modules["megatron_emo.cpu"] = None  # importing it raises ImportError

def poisoned(name):
    def cuda_call(*args, **kwargs):
        raise RuntimeError(f"torch.cuda.{name} called on the conversion path")
    return cuda_call

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
for name in ("synchronize", "current_device", "current_stream", "set_device", "Stream",
             "Event", "get_rng_state", "manual_seed"):
    setattr(torch.cuda, name, poisoned(name))
from megatron.core import parallel_state
from megatron_emo.conversion.from_hf import import_from_hf
from megatron_emo.conversion.to_hf import export_to_hf
import_from_hf(sys.argv[1] if len(sys.argv) > 1 else "HF", "m", ep=2)
export_to_hf("m", "hf2", max_shard_bytes=40_000)
print("DIST", dist.is_initialized(), "MP", parallel_state.model_parallel_is_initialized(),
      "CPU_BACKEND", sys.modules["megatron_emo.cpu"])
'''


def test_cuda_available_branch_needs_no_cpu_backend(tmp_path, hf_dir):
    path, _ = hf_dir
    proc = _child(_FORCED_CUDA.replace('"HF"', repr(path)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DIST False MP False CPU_BACKEND None" in proc.stdout
    assert _dir_bytes(path) == _dir_bytes(tmp_path / "hf2")


_KILLED = r'''
import os, signal, sys
from megatron_emo.conversion import hf_io
from megatron_emo.conversion.from_hf import import_from_hf
real_get, calls = hf_io.HFWeights.get, [0]

def get(self, name):
    calls[0] += 1
    if calls[0] == 40:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_get(self, name)

hf_io.HFWeights.get = get
import_from_hf(HF, "m")
'''


def test_killed_import_leaves_nothing_that_looks_complete(tmp_path, hf_dir):
    path, sd = hf_dir
    proc = _child(_KILLED.replace("HF,", repr(path) + ","), tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (tmp_path / "m").exists()
    (left,) = _partials(tmp_path)  # the partial output, which names itself as such
    assert os.path.getsize(tmp_path / left / "release" / "__0_0.distcp") > 0  # killed mid-write
    assert not os.path.exists(tmp_path / left / "release" / "metadata.json")
    import_from_hf(path, str(tmp_path / "m"))  # the next import removes the dead one's leftovers
    assert _partials(tmp_path) == [] and (tmp_path / "m" / "release" / "metadata.json").exists()
