"""Export (Megatron torch_dist -> HF) time and peak RSS on CPU for a ~1.6 GB fp32 EMO model.

Stages run in separate subprocesses so each peak RSS is its own:
  0. baseline: import torch + megatron + megatron_emo.conversion, nothing else;
  1. write a random HF checkpoint (streamed, never whole in memory);
  2. from-hf: import it into a Megatron torch_dist checkpoint (builds the model once);
  3. to-hf: export it back, once per --shard-mb value, reported against the largest shard.

Usage:
  OMP_NUM_THREADS=1 python benchmarks/bench_convert.py [--workdir /tmp/bench] [--shard-mb 128 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(num_layers=6, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
             head_dim=128, intermediate_size=512, num_experts=32, num_shared_experts=1,
             num_experts_per_tok=4, vocab_size=32768)


def _stage(code: str) -> tuple[float, float, str]:
    """Runs ``code`` in a fresh interpreter: (wall seconds, peak RSS MiB, stdout)."""
    wrapper = (
        "import resource, sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        "print('WALL', time.perf_counter() - t0)\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", wrapper], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    wall = float(next(line.split()[1] for line in out.splitlines() if line.startswith("WALL")))
    rss = float(next(line.split()[1] for line in out.splitlines() if line.startswith("RSS")))
    return wall, rss, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/emo_bench_convert")
    parser.add_argument("--shard-mb", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    hf_in, ckpt = os.path.join(args.workdir, "hf_in"), os.path.join(args.workdir, "mcore")
    rows = []
    wall, rss, _ = _stage("import torch, megatron.core, megatron_emo.conversion.to_hf")
    rows.append(("baseline imports", "-", wall, rss))
    wall, rss, _ = _stage(
        "import os, torch\n"
        "from megatron_emo.conversion.hf_config import (EmoShape, copy_modeling_files,\n"
        "    write_config)\n"
        "from megatron_emo.conversion.hf_io import ShardWriter\n"
        "from megatron_emo.conversion.key_map import hf_shapes\n"
        f"shape = EmoShape(**{SHAPE!r})\n"
        f"os.makedirs({hf_in!r}); w = ShardWriter({hf_in!r}, 512 * 2**20)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for n, s in hf_shapes(shape).items(): w.add(n, 0.02 * torch.randn(s, generator=g))\n"
        f"w.close(); write_config({hf_in!r}, shape, 'float32'); copy_modeling_files({hf_in!r})\n"
    )
    size = json.load(open(os.path.join(hf_in, "model.safetensors.index.json")))["metadata"][
        "total_size"]
    rows.append(("write random HF", "512", wall, rss))
    wall, rss, _ = _stage(
        "from megatron_emo.conversion.from_hf import import_from_hf\n"
        f"import_from_hf({hf_in!r}, {ckpt!r})"
    )
    rows.append(("from-hf", "-", wall, rss))
    for mb in args.shard_mb:
        out = os.path.join(args.workdir, f"hf_out_{mb}")
        wall, rss, text = _stage(
            "from megatron_emo.conversion.to_hf import export_to_hf\n"
            f"i = export_to_hf({ckpt!r}, {out!r}, max_shard_bytes={mb} * 2**20)\n"
            "print('LARGEST', i['largest_shard_bytes'])"
        )
        largest = int(next(x.split()[1] for x in text.splitlines() if x.startswith("LARGEST")))
        rows.append((f"to-hf (largest shard {largest / 2**20:.0f} MiB)", str(mb), wall, rss))
    print(f"model: {SHAPE}\nweights: {size / 2**30:.2f} GiB fp32\n")
    print("| stage | shard limit MiB | wall s | peak RSS MiB |\n|---|---|---|---|")
    for name, mb, wall, rss in rows:
        print(f"| {name} | {mb} | {wall:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
