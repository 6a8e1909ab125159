"""Reversible patches: ``PatchSet`` restores what it replaced; the CPU backend undoes its table.

``megatron_emo.patching.PatchSet`` restores own and inherited attributes and exits its contexts;
``megatron_emo.cpu.disable()`` restores every row of ``megatron_emo.cpu.PATCHES``.

The CPU backend check runs in a fresh process, so no other test's backend is involved and this
process keeps no Megatron patches.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/unit/test_patching.py -q``
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from megatron_emo.patching import Patch, PatchSet

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Base:
    def method(self) -> str:
        return "base"


class _Child(_Base):
    pass


def test_patch_set_restores_own_and_inherited_attributes_and_exits_contexts():
    module = types.ModuleType("fake")
    module.value = 1
    events = []

    class Context:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    patches = PatchSet(
        [
            Patch(module, "value", 2, "fake.py:1"),
            Patch(module, "added", 3, "fake.py:2"),
            Patch(_Child, "method", lambda orig: lambda self: "child+" + orig(self), "f.py:3",
                  wraps=True),
        ],
        contexts=[Context],
    )
    assert patches.apply() and not patches.apply()  # idempotent
    assert (module.value, module.added, _Child().method(), events) == (2, 3, "child+base",
                                                                        ["enter"])
    assert patches.undo() and not patches.undo()
    assert module.value == 1 and not hasattr(module, "added")
    assert "method" not in vars(_Child) and _Child().method() == "base"
    assert events == ["enter", "exit"]
    with patches:
        with patches:  # nested: the inner block applied nothing, so it undoes nothing
            pass
        assert patches.applied
    assert not patches.applied


_CPU_BACKEND_UNDO = r'''
import os
import torch
from megatron_emo import cpu

ABSENT = object()


def own(target, name):
    return vars(target).get(name, ABSENT)


rows = [(patch, patch.resolve()) for patch in cpu.PATCHES]
assert {patch.group for patch in cpu.PATCHES} == {"backend", "training"}
before = [own(target, patch.name) for patch, target in rows]
modes = torch._C._len_torch_function_stack()
env = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
for round in range(2):
    cpu.enable(training=True)
    for (patch, target), old in zip(rows, before):
        assert own(target, patch.name) is not old, f"not applied: {patch}"
    assert torch._C._len_torch_function_stack() == modes + 1
    assert torch.cuda.current_device() == torch.device("cpu")
    cpu.disable()
    for (patch, target), old in zip(rows, before):
        assert own(target, patch.name) is old, f"not restored: {patch}"
    assert torch._C._len_torch_function_stack() == modes
    assert os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == env
with cpu.enabled():
    assert cpu.is_enabled() and not cpu.is_enabled(training=True)
assert not cpu.is_enabled()
assert all(own(target, patch.name) is old for (patch, target), old in zip(rows, before))
torch.cuda.is_available = lambda: True  # a CUDA machine
try:
    cpu.enable()
except RuntimeError as err:
    assert "machines without CUDA" in str(err)
else:
    raise AssertionError("enable() on a CUDA machine did not raise")
print("RESTORED", len(rows))
'''


def test_cpu_backend_disable_restores_every_patched_attribute():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    proc = subprocess.run([sys.executable, "-c", _CPU_BACKEND_UNDO], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and "this one has a GPU" in proc.stderr:
        pytest.skip("the CPU backend refuses machines with CUDA")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESTORED" in proc.stdout
