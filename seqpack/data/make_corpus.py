"""Rebuild ``corpus.jsonl.zst``, the small bundled demo corpus (self-written, no third-party text).

Documents are field-notes-style English built from sentence templates written for seqpack, with a
log-normal length distribution (median ~700 bytes, long right tail past 16 KB) so that packing,
splitting and the length histogram have something real to show. Deterministic for a seed::

    python seqpack/data/make_corpus.py            # writes next to this file
"""

from __future__ import annotations

import json
import os
import random

import zstandard

SUBJECTS = [
    "the river keeper", "a young cartographer", "the night shift", "our survey team", "the old lighthouse",
    "a flock of starlings", "the village baker", "the weather station", "a travelling clockmaker",
    "the orchard", "the harbour crane", "a retired engineer", "the school choir", "the ferry captain",
    "the beekeeper", "a quiet librarian", "the mountain railway", "the glassworks", "the tide",
    "the botanist", "a pair of herons", "the signal box", "the mill wheel", "the archive",
]
VERBS = [
    "measured", "repaired", "recorded", "followed", "painted", "carried", "counted", "mapped",
    "listened to", "cleaned", "rebuilt", "described", "tested", "catalogued", "watched", "restored",
]
OBJECTS = [
    "the eastern wall", "every bridge on the canal", "the spring floods", "a box of brass gears",
    "the morning fog", "forty jars of honey", "the lower meadow", "a map of the coastline",
    "the broken weather vane", "the first frost", "a crate of letters", "the signal lamps",
    "the tide tables", "the northern path", "the bell tower", "a collection of seeds",
]
PLACES = [
    "near the harbour", "behind the mill", "on the ridge", "by the old quarry", "along the canal",
    "in the valley", "at the crossroads", "under the viaduct", "beside the greenhouse", "on the island",
]
TIMES = [
    "before dawn", "after the storm", "in late autumn", "during the long winter", "at noon",
    "on the first day of spring", "every evening", "once a month", "after the harvest", "at low tide",
]
REMARKS = [
    "Nobody had written it down before.", "The numbers agreed with last year's notes.",
    "It took longer than anyone expected.", "Two of the readings were clearly wrong and were repeated.",
    "The work was slow but careful.", "Everyone agreed it should be done again next season.",
    "A small mistake in the first count was found and corrected.", "The results were pinned to the board.",
]
QUESTIONS = [
    "How long does the ferry take to cross?", "Why does the mill wheel stop in August?",
    "Who keeps the key to the bell tower?", "What is stored in the archive basement?",
    "When do the herons return?", "How many bridges cross the canal?",
]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(w) for w in (SUBJECTS, VERBS, OBJECTS, PLACES, TIMES)]
    s = " ".join(words) + "."
    s = s[0].upper() + s[1:]
    if rng.random() < 0.25:
        s += " " + rng.choice(REMARKS)
    return s


def document(rng: random.Random, target_bytes: int) -> str:
    kind = rng.random()
    if kind < 0.15:  # a short question and answer
        return f"Q: {rng.choice(QUESTIONS)}\nA: {sentence(rng)}"
    parts, size, para = [], 0, []
    title = f"Notes {rng.randint(1, 400)}: {rng.choice(SUBJECTS)} {rng.choice(PLACES)}"
    parts.append(title.title())
    while size < target_bytes:
        s = sentence(rng)
        para.append(s)
        size += len(s) + 1
        if len(para) >= rng.randint(3, 7):
            parts.append(" ".join(para))
            para = []
    if para:
        parts.append(" ".join(para))
    return "\n\n".join(parts)


def make_corpus(n_docs: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_docs):
        target = int(min(max(rng.lognormvariate(6.55, 1.0), 40), 24_000))  # median ~700 bytes
        out.append(document(rng, target))
    return out


def main() -> None:
    docs = make_corpus()
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.jsonl.zst")
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=19).compress(data))
    print(f"{path}: {len(docs)} documents, {len(data):,} bytes -> {os.path.getsize(path):,} compressed")


if __name__ == "__main__":
    main()
