"""Peak memory and time of the streaming conversion (both directions) for a ~1.5 GB EMO model.

Every stage runs in a fresh interpreter so each peak RSS (``ru_maxrss``) is its own:
  0. baseline: import torch + megatron.core + the conversion modules, nothing else;
  1. write a random HF checkpoint (fp32), once per --shard-mb value (streamed, never whole);
  2. from-hf: each HF checkpoint -> a Megatron torch_dist checkpoint (EP-balanced layout);
  3. to-hf: the checkpoint -> HF, once per --shard-mb value.
Each conversion is reported against issue 14's bound: baseline + 1.5 x the largest shard (the
input HF shard for from-hf, the output shard for to-hf). Peak RSS over baseline divided by the
largest shard is the ratio column; the bound holds when it is <= 1.5.

With ``--compare-root DIR`` (a checkout of an earlier version, e.g. ``git worktree add DIR REV``)
the same from-hf / to-hf calls also run with that version's ``megatron_emo`` (API of commit
58dbe63: ``import_from_hf(hf, out)``, ``export_to_hf(ckpt, out, max_shard_bytes=...)``).

Usage:
  OMP_NUM_THREADS=1 python benchmarks/bench_convert.py [--workdir /tmp/bench] [--shard-mb 128 512]
      [--compare-root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(num_layers=6, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
             head_dim=128, intermediate_size=512, num_experts=32, num_shared_experts=1,
             num_experts_per_tok=4, vocab_size=32768)
MIB = 2**20


def _stage(code: str, root: str = ROOT) -> tuple[float, float, str]:
    """Runs ``code`` in a fresh interpreter with ``root`` first on sys.path.

    Returns (wall s, peak RSS MiB, stdout).
    """
    wrapper = (
        "import resource, sys, time\n"
        f"sys.path.insert(0, {root!r})\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        "print('WALL', time.perf_counter() - t0)\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", wrapper], env=env, cwd=root,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"stage failed:\n{code}\n{proc.stderr[-3000:]}")
    out = proc.stdout
    wall = float(next(line.split()[1] for line in out.splitlines() if line.startswith("WALL")))
    rss = float(next(line.split()[1] for line in out.splitlines() if line.startswith("RSS")))
    return wall, rss, out


def _largest_file(path: str, suffix: str) -> int:
    return max(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(suffix))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/emo_bench_convert")
    parser.add_argument("--shard-mb", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--ep", type=int, default=8, help="from-hf --ep (padding: 31 -> 32)")
    parser.add_argument("--compare-root", help="checkout of an earlier version to run as well")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    rows = []
    _, base, _ = _stage("import torch, megatron.core\n"
                        "import megatron_emo.conversion.from_hf, megatron_emo.conversion.to_hf")
    rows.append(("baseline imports", "-", "-", 0.0, base, "-"))

    def bound_row(name, mb, wall, rss, largest):
        ratio = (rss - base) / (largest / MIB)
        rows.append((name, str(mb), f"{largest / MIB:.0f}", wall, rss,
                     f"{ratio:.2f} ({'ok' if ratio <= 1.5 else 'OVER'})"))

    ckpt = None
    for mb in args.shard_mb:
        hf_in = os.path.join(args.workdir, f"hf_in_{mb}")
        wall, rss, _ = _stage(
            "import os, torch\n"
            "from megatron_emo.conversion.hf_config import (EmoShape, copy_modeling_files,\n"
            "    write_config)\n"
            "from megatron_emo.conversion.hf_io import StreamingShardWriter\n"
            "from megatron_emo.conversion.key_map import hf_shapes\n"
            f"shape = EmoShape(**{SHAPE!r})\n"
            "entries = [(n, s, torch.float32) for n, s in hf_shapes(shape).items()]\n"
            f"os.makedirs({hf_in!r}); w = StreamingShardWriter({hf_in!r}, entries, {mb} * 2**20)\n"
            "g = torch.Generator().manual_seed(0)\n"
            "for n, s, _ in entries: w.add(n, 0.02 * torch.randn(s, generator=g))\n"
            f"w.close(); write_config({hf_in!r}, shape, 'float32')\n"
            f"copy_modeling_files({hf_in!r})\n"
        )
        rows.append((f"write random HF ({mb} MiB shards)", str(mb), "-", wall, rss, "-"))
        out = os.path.join(args.workdir, f"mcore_{mb}")
        wall, rss, _ = _stage(
            "from megatron_emo.conversion.from_hf import import_from_hf\n"
            f"import_from_hf({hf_in!r}, {out!r}, ep={args.ep}, progress=False)"
        )
        bound_row(f"from-hf --ep {args.ep} (input shards {mb} MiB)", mb, wall, rss,
                  _largest_file(hf_in, ".safetensors"))
        ckpt = ckpt or out
    size = json.load(open(os.path.join(args.workdir, f"hf_in_{args.shard_mb[0]}",
                                       "model.safetensors.index.json")))["metadata"]["total_size"]
    for mb in args.shard_mb:
        out = os.path.join(args.workdir, f"hf_out_{mb}")
        wall, rss, text = _stage(
            "from megatron_emo.conversion.to_hf import export_to_hf\n"
            f"i = export_to_hf({ckpt!r}, {out!r}, max_shard_bytes={mb} * 2**20, progress=False)\n"
            "print('LARGEST', i['largest_shard_bytes'])"
        )
        largest = int(next(x.split()[1] for x in text.splitlines() if x.startswith("LARGEST")))
        bound_row(f"to-hf (output shards {mb} MiB)", mb, wall, rss, largest)
    if args.compare_root:
        hf_in = os.path.join(args.workdir, f"hf_in_{args.shard_mb[-1]}")
        old_ckpt = os.path.join(args.workdir, "mcore_compare")
        wall, rss, _ = _stage(
            "from megatron_emo.conversion.from_hf import import_from_hf\n"
            f"import_from_hf({hf_in!r}, {old_ckpt!r})", root=args.compare_root)
        bound_row(f"compare-root from-hf (input shards {args.shard_mb[-1]} MiB)",
                  args.shard_mb[-1], wall, rss, _largest_file(hf_in, ".safetensors"))
        for mb in args.shard_mb:
            out = os.path.join(args.workdir, f"hf_compare_{mb}")
            wall, rss, text = _stage(
                "from megatron_emo.conversion.to_hf import export_to_hf\n"
                f"i = export_to_hf({old_ckpt!r}, {out!r}, max_shard_bytes={mb} * 2**20)\n"
                "print('LARGEST', i['largest_shard_bytes'])", root=args.compare_root)
            largest = int(next(x.split()[1] for x in text.splitlines()
                               if x.startswith("LARGEST")))
            bound_row(f"compare-root to-hf (output shards {mb} MiB)", mb, wall, rss, largest)
    print(f"model: {SHAPE}\nweights: {size / 2**30:.2f} GiB fp32\n")
    print("| stage | shard limit MiB | largest shard MiB | wall s | peak RSS MiB | "
          "(peak - baseline) / largest shard (bound 1.5) |\n|---|---|---|---|---|---|")
    for name, mb, largest, wall, rss, ratio in rows:
        print(f"| {name} | {mb} | {largest} | {wall:.1f} | {rss:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
