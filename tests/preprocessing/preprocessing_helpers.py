"""Helpers shared by the preprocessing tests: record generation, JSONL writing, CLI environment."""

from __future__ import annotations

import json
import os
import random

WORDS = ("alpha beta gamma delta epsilon zeta the of and to in is for with def return class "
         "import self print value result sum total river mountain stone light 0 1 2 3 42 - + ="
         ).split()


def make_records(num_records: int, *, seed: int = 0, prefix: str = "r") -> list[dict]:
    """Returns varied-length records with text, domain, source and id."""
    rng = random.Random(seed)
    records = []
    for i in range(num_records):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        if i % 4 == 0:
            text = f"def f{i}(x):\n    return x + {i}\n\n" + text
        if i % 7 == 0:
            text += " caf\u00e9 \u00fcber \u4e2d\u6587"
        records.append({"text": text, "domain": f"d{i % 3}", "source": "tests",
                        "id": f"{prefix}{i}"})
    return records


def write_jsonl(path, records, *, compress: bool = False) -> str:
    """Writes records (dicts, or raw ``str``/``bytes`` lines) as JSONL(.gz); returns the path."""
    import gzip

    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
             for r in records]
    data = b"".join(line + b"\n" for line in lines)
    path = str(path)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


def subprocess_env() -> dict:
    """Environment for CLI subprocesses: this checkout first on PYTHONPATH, one thread."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env
