"""Layer boundary: ``megatron_emo.routing`` is pure torch (STYLE.md rules 1-2).

No megatron, transformer_engine or torch.distributed import.

Imports the package in a subprocess (clean ``sys.modules``) with megatron and transformer_engine
blocked by a meta-path finder, and scans the routing sources for forbidden imports.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_import_boundaries.py -q``
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTING_DIR = os.path.join(REPO_ROOT, "megatron_emo", "routing")
FORBIDDEN = ("megatron", "transformer_engine", "torch.distributed")

_CHILD = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = ("megatron", "transformer_engine")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import: {name}")
            return None

    sys.meta_path.insert(0, Blocker())

    import torch  # noqa: F401  (torch itself may load torch.distributed; only our delta counts)

    before = set(sys.modules)
    import megatron_emo.routing as routing

    new = set(sys.modules) - before
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), sorted(sys.modules)
    bad = sorted(m for m in new if m == "torch.distributed" or m.startswith("torch.distributed."))
    assert not bad, f"megatron_emo.routing imported {bad}"
    ours = sorted(m for m in new if m.startswith("megatron_emo"))
    assert "megatron_emo.routing.route" in ours, ours
    assert callable(routing.emo_route)
    print("OK", ours)
    """
)


def test_routing_imports_without_megatron() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    res = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK")


def _imported_modules(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            # ``from torch import distributed``
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_routing_sources_have_no_forbidden_imports() -> None:
    files = sorted(f for f in os.listdir(ROUTING_DIR) if f.endswith(".py"))
    assert "route.py" in files
    for name in files:
        path = os.path.join(ROUTING_DIR, name)
        for module in _imported_modules(path):
            assert not any(module == f or module.startswith(f + ".") for f in FORBIDDEN), (
                f"{name} imports {module}"
            )
        assert not _uses_torch_distributed_attribute(path), f"{name} uses torch.distributed"


def test_parallel_layer_imports_no_megatron() -> None:
    """``parallel/`` (collectives and layouts) sits below the Megatron adapters (STYLE rule 1)."""
    parallel_dir = os.path.join(REPO_ROOT, "megatron_emo", "parallel")
    files = sorted(f for f in os.listdir(parallel_dir) if f.endswith(".py"))
    assert "layout.py" in files
    for name in files:
        for module in _imported_modules(os.path.join(parallel_dir, name)):
            assert not module.startswith(("megatron.", "transformer_engine")), (
                f"parallel/{name} imports {module}"
            )
            assert module != "megatron", f"parallel/{name} imports megatron"


def _uses_torch_distributed_attribute(path: str) -> bool:
    """True if the code (not docstrings) touches ``torch.distributed`` as an attribute."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "distributed"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
        for node in ast.walk(tree)
    )


_GPU_PATH_CHILD = textwrap.dedent(
    """
    import sys

    import megatron_emo.conversion.from_hf
    import megatron_emo.conversion.to_hf
    import megatron_emo.mcore
    import megatron_emo.subsets
    import megatron_emo.train
    import megatron_emo.training.model_provider
    import megatron_emo.training.step

    loaded = sorted(m for m in sys.modules if m.split(".")[:2] == ["megatron_emo", "cpu"])
    assert not loaded, loaded
    print("OK")
    """
)


def test_gpu_path_and_tools_never_import_the_cpu_backend() -> None:
    """The CPU backend stays unimported on the GPU path and in the tools.

    The training path without ``--cpu``, the adapters, conversion and subsets leave
    ``megatron_emo.cpu`` unimported (STYLE: the CPU backend is never imported on GPU runs).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    res = subprocess.run(
        [sys.executable, "-c", _GPU_PATH_CHILD], capture_output=True, text=True, env=env,
        cwd=REPO_ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("OK")
