"""Deterministic builder of the embedded multi-domain sample corpus (``sample_corpus/`` here).

Five domains from offline, redistributable text: Python standard-library code and documentation
(PSF licence), Debian licence/copyright texts, and procedurally generated math worked solutions
and short stories. Fixed seeds and sorted file lists; gzip with mtime 0, so a rebuild from the same
sources is byte-identical. CLI: ``python tools/build_sample_corpus.py [OUTPUT_DIR]``.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import io
import json
import math
import os
import random
import sysconfig
from collections.abc import Callable, Sequence
from fractions import Fraction

__all__ = ["DOMAINS", "build_domain", "build_sample_corpus", "write_domain"]

DOCS_PER_DOMAIN = 600
MAX_DOC_CHARS = 12_000
LICENSE_MAX_BYTES = 40_000


def _stdlib_files() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "*.py")))


def _stdlib_source(path: str) -> str:
    return f"cpython-stdlib:{os.path.basename(path)}"


def _code_records(seed: int) -> list[dict]:
    """Top-level functions and classes of the stdlib ``*.py`` modules, source verbatim."""
    candidates = []
    for path in _stdlib_files():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                segment = ast.get_source_segment(source, node)
                if segment and 3 <= segment.count("\n") and len(segment) <= MAX_DOC_CHARS:
                    candidates.append({"text": segment,
                                       "source": f"{_stdlib_source(path)}:{node.name}"})
    return random.Random(seed).sample(candidates, min(DOCS_PER_DOMAIN, len(candidates)))


def _manual_records(seed: int) -> list[dict]:
    """Python reference-manual topics (``pydoc_data``) and long stdlib docstrings."""
    from pydoc_data.topics import topics

    records = [{"text": topics[name].strip(), "source": f"cpython-pydoc-topics:{name}"}
               for name in sorted(topics) if len(topics[name].strip()) <= MAX_DOC_CHARS]
    candidates = []
    for path in _stdlib_files():
        with open(path, encoding="utf-8") as f:
            try:
                tree = ast.parse(f.read())
            except SyntaxError:
                continue
        nodes = [("module", tree)] + [(n.name, n) for n in ast.walk(tree) if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for name, node in nodes:
            doc = ast.get_docstring(node)
            if doc and 400 <= len(doc) <= MAX_DOC_CHARS:
                candidates.append({"text": doc, "source": f"{_stdlib_source(path)}:{name}"})
    need = max(0, DOCS_PER_DOMAIN - len(records))
    return records + random.Random(seed).sample(candidates, min(need, len(candidates)))


def _license_records(seed: int) -> list[dict]:
    """Debian ``/usr/share/common-licenses`` and ``/usr/share/doc/*/copyright`` texts, whole."""
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    paths += sorted(glob.glob("/usr/share/doc/*/copyright"))
    seen: set[str] = set()
    records = []
    for path in paths:
        if not os.path.isfile(path) or os.path.getsize(path) > LICENSE_MAX_BYTES:
            continue
        with open(path, "rb") as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            records.append({"text": text, "source": f"debian:{path}"})
    random.Random(seed).shuffle(records)
    return records[:DOCS_PER_DOMAIN]


# ----------------------------------------------------------------------------------------------
# Procedural math: worked solutions with every step shown.

def _linear_equation(rng: random.Random) -> str:
    a, x = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 11, 12]), rng.randint(-20, 20)
    b = rng.randint(-50, 50)
    c = a * x + b
    return (f"Solve for x: {a}x + ({b}) = {c}.\n"
            f"Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}.\n"
            f"Divide both sides by {a}: x = {c - b} / {a} = {x}.\n"
            f"Check: {a} * ({x}) + ({b}) = {a * x + b}, which equals {c}.\nAnswer: x = {x}")


def _linear_system(rng: random.Random) -> str:
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    a1, b1, a2, b2 = (rng.randint(1, 6) for _ in range(4))
    if a1 * b2 - a2 * b1 == 0:
        b2 += 1
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    det = a1 * b2 - a2 * b1
    return (f"Solve the system:\n  {a1}x + {b1}y = {c1}\n  {a2}x + {b2}y = {c2}\n"
            f"Multiply the first equation by {b2} and the second by {b1}:\n"
            f"  {a1 * b2}x + {b1 * b2}y = {c1 * b2}\n  {a2 * b1}x + {b1 * b2}y = {c2 * b1}\n"
            f"Subtract: {det}x = {c1 * b2 - c2 * b1}, so x = {x}.\n"
            f"Substitute into the first equation: {b1}y = {c1} - ({a1 * x}) = {c1 - a1 * x}, "
            f"so y = {y}.\nAnswer: (x, y) = ({x}, {y})")


def _quadratic(rng: random.Random) -> str:
    r1, r2 = rng.randint(-12, 12), rng.randint(-12, 12)
    b, c = -(r1 + r2), r1 * r2
    disc = b * b - 4 * c
    return (f"Solve x^2 + ({b})x + ({c}) = 0.\n"
            f"We look for two numbers with product {c} and sum {-b}: they are {r1} and {r2}.\n"
            f"So x^2 + ({b})x + ({c}) = (x - ({r1}))(x - ({r2})).\n"
            f"The discriminant is ({b})^2 - 4*({c}) = {disc} = {math.isqrt(disc)}^2, "
            f"consistent with integer roots.\nAnswer: x = {r1} or x = {r2}")


def _fractions(rng: random.Random) -> str:
    p, q = Fraction(rng.randint(1, 9), rng.randint(2, 12)), Fraction(rng.randint(1, 9),
                                                                      rng.randint(2, 12))
    lcm = p.denominator * q.denominator // math.gcd(p.denominator, q.denominator)
    return (f"Compute {p} + {q}.\nThe least common denominator of {p.denominator} and "
            f"{q.denominator} is {lcm}.\n"
            f"{p} = {p.numerator * lcm // p.denominator}/{lcm} and "
            f"{q} = {q.numerator * lcm // q.denominator}/{lcm}.\n"
            f"Add the numerators: {(p + q) * lcm}/{lcm}, which reduces to {p + q}.\n"
            f"Answer: {p + q}")


def _gcd(rng: random.Random) -> str:
    g = rng.randint(2, 30)
    a, b = g * rng.randint(5, 60), g * rng.randint(2, 40)
    lines = [f"Find gcd({a}, {b}) with the Euclidean algorithm."]
    x, y = max(a, b), min(a, b)
    while y:
        lines.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    lines.append(f"The last non-zero remainder is {x}.\nAnswer: {x}")
    return "\n".join(lines)


def _percent(rng: random.Random) -> str:
    item = rng.choice(["a bicycle", "a coat", "a lamp", "a set of books", "a tent", "a kettle"])
    price, pct = rng.randint(20, 400), rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    off = Fraction(price * pct, 100)
    return (f"{item.capitalize()} costs ${price}. It is discounted by {pct}%. "
            f"What is the new price?\nThe discount is {pct}/100 * {price} = ${float(off):g}.\n"
            f"New price: {price} - {float(off):g} = ${float(price - off):g}.\n"
            f"Answer: ${float(price - off):g}")


def _series(rng: random.Random) -> str:
    a, d, n = rng.randint(-10, 20), rng.randint(1, 9), rng.randint(5, 40)
    last = a + (n - 1) * d
    return (f"Find the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, "
            f"{a + 2 * d}, ...\nThe common difference is {d}; the {n}th term is "
            f"{a} + ({n} - 1) * {d} = {last}.\n"
            f"Sum = n * (first + last) / 2 = {n} * ({a} + {last}) / 2 = {n * (a + last) // 2}.\n"
            f"Answer: {n * (a + last) // 2}")


def _arithmetic(rng: random.Random) -> str:
    a, b, c = rng.randint(10, 999), rng.randint(2, 99), rng.randint(1, 500)
    return (f"Compute {a} * {b} - {c}.\nFirst multiply: {a} * {b} = {a * b}.\n"
            f"Then subtract: {a * b} - {c} = {a * b - c}.\nAnswer: {a * b - c}")


_MATH_KINDS = (_linear_equation, _linear_system, _quadratic, _fractions, _gcd, _percent,
               _series, _arithmetic)


def _math_records(seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(DOCS_PER_DOMAIN):
        num_problems = rng.choice([1, 1, 2, 3, 4, 6, 8, 12])
        problems = [f"Problem {k + 1}. {rng.choice(_MATH_KINDS)(rng)}"
                    for k in range(num_problems)]
        records.append({"text": "\n\n".join(problems), "source": "generated:math-v1"})
    return records


# ----------------------------------------------------------------------------------------------
# Procedural stories (no redistributable prose corpus is available offline on the build machine).

_NAMES = ("Ada", "Bram", "Cleo", "Dario", "Esme", "Farid", "Greta", "Hugo", "Ines", "Jonah",
          "Kaia", "Leon", "Mira", "Nils", "Odile", "Pavel", "Quinn", "Rosa", "Soren", "Talia")
_ROLES = ("a lighthouse keeper", "a baker", "a retired sailor", "a young cartographer",
          "a beekeeper", "a clockmaker", "a night-train conductor", "a schoolteacher",
          "a shepherd", "a violin repairer", "a ferry pilot", "a botanist")
_PLACES = ("a fishing village on a windy coast", "a hill town above a slow river",
           "a market city built around an old canal", "a cabin at the edge of a pine forest",
           "an island reached only at low tide", "a mountain pass where snow came early",
           "a quiet street of narrow brick houses", "a farm between two long valleys")
_GOALS = ("find the owner of a letter that had waited forty years to be delivered",
          "repair the tower clock before the winter festival",
          "bring a sick goat across the river before the storm",
          "finish a map of the caves beneath the town",
          "learn why the birds had stopped singing in the orchard",
          "return a borrowed boat that had drifted out to sea",
          "win back the trust of an old friend", "plant a garden that would outlive them")
_OBSTACLES = ("the bridge had washed away in the night", "nobody in town remembered the name",
              "the only key was lost somewhere in the snow",
              "a rival had promised to do the same thing first",
              "the instructions were written in a language no one spoke any more",
              "the road was closed by a fallen oak", "their own fear of deep water",
              "a letter arrived that changed everything")
_WEATHER = ("Rain drummed on the roofs", "A thin fog lay over the fields",
            "The sun came up pale and cold", "Wind pushed the clouds inland",
            "The first frost silvered the grass", "Evening light turned the water gold")
_FEELINGS = ("hopeful", "tired but determined", "nervous", "quietly amused", "restless",
             "proud", "uncertain", "grateful")
_ACTIONS = ("walked to the harbour and asked the fishermen", "climbed to the attic and searched "
            "the old trunks", "wrote down everything they knew in a small notebook",
            "borrowed a lantern from the neighbours", "waited by the window until dawn",
            "followed the footprints down to the river", "spent the afternoon fixing the cart",
            "visited the library and read the town records")
_LINES = ("We could try again tomorrow.", "I never thought it would be this hard.",
          "Do you hear that?", "It was here all along.", "Nobody has to know.",
          "Let me carry that for you.", "Then we go together.", "Is it really that late?")


def _story(rng: random.Random) -> str:
    hero, friend = rng.sample(_NAMES, 2)
    role, place, goal = rng.choice(_ROLES), rng.choice(_PLACES), rng.choice(_GOALS)
    season = rng.choice(["spring", "summer", "autumn", "winter"])
    paragraphs = [f"{hero} was {role} who lived in {place}. One {season} "
                  f"morning {hero} decided to {goal}."]
    for _ in range(rng.choice([0, 1, 2, 3, 4, 6, 9, 14, 20])):
        kind = rng.random()
        if kind < 0.3:
            paragraphs.append(f"{rng.choice(_WEATHER)}. {hero} felt {rng.choice(_FEELINGS)} "
                              f"and {rng.choice(_ACTIONS)}.")
        elif kind < 0.55:
            paragraphs.append(f"But {rng.choice(_OBSTACLES)}. {friend}, {rng.choice(_ROLES)}, "
                              f"came by and said, \"{rng.choice(_LINES)}\" {hero} answered, "
                              f"\"{rng.choice(_LINES)}\"")
        elif kind < 0.8:
            paragraphs.append(f"For {rng.randint(2, 30)} days {hero} {rng.choice(_ACTIONS)}. "
                              f"Each evening {friend} {rng.choice(_ACTIONS)}, and each evening "
                              f"they compared notes by the stove.")
        else:
            paragraphs.append(f"{hero} remembered a story their grandmother told about "
                              f"{rng.choice(_PLACES)}, and about someone who tried to "
                              f"{rng.choice(_GOALS)}. {rng.choice(_WEATHER)} in that story too.")
    paragraphs.append(f"In the end {hero} managed to {goal}, though not in the way anyone "
                      f"expected. {friend} said only, \"{rng.choice(_LINES)}\"")
    return "\n\n".join(paragraphs)


def _narrative_records(seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": _story(rng), "source": "generated:stories-v1"}
            for _ in range(DOCS_PER_DOMAIN)]


DOMAINS: dict[str, tuple[Callable[[int], list[dict]], int]] = {
    "code": (_code_records, 101),
    "legal": (_license_records, 102),
    "manual": (_manual_records, 103),
    "math": (_math_records, 104),
    "narrative": (_narrative_records, 105),
}


def build_domain(domain: str) -> list[dict]:
    """Returns one domain's records ``{"text", "domain", "source", "id"}`` in file order.

    Raises:
        ValueError: for an unknown domain.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(DOMAINS)}")
    make, seed = DOMAINS[domain]
    return [{"text": r["text"], "domain": domain, "source": r["source"],
             "id": f"{domain}-{i:05d}"} for i, r in enumerate(make(seed))]


def write_domain(records: Sequence[dict], path: str) -> None:
    """Writes records as byte-deterministic JSONL.gz (gzip mtime 0, no file name in the header)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(path + ".partial", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".partial", path)


def build_sample_corpus(output_dir: str, domains: Sequence[str] | None = None) -> dict[str, int]:
    """Builds ``{output_dir}/{domain}.jsonl.gz`` for each domain; returns documents per domain."""
    os.makedirs(output_dir, exist_ok=True)
    counts = {}
    for domain in domains or sorted(DOMAINS):
        records = build_domain(domain)
        write_domain(records, os.path.join(output_dir, f"{domain}.jsonl.gz"))
        counts[domain] = len(records)
    return counts
