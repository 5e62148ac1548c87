"""Benchmark contamination: n-gram overlap between a training dataset and the benchmark questions,
so a distilled dataset cannot silently contain MT-Bench.

Text is normalised (case, punctuation, whitespace); words are the unit for space-separated
languages and characters for Chinese/Japanese, where there are no spaces. A training row is flagged
when a question shares at least `threshold` of its n-grams with it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from typing import Any, Iterable

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def units(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text)
    if len(_CJK.findall(text)) > len(text) / 4:
        return [c for c in text if not c.isspace()]
    return text.split()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    u = units(text)
    return {tuple(u[i:i + n]) for i in range(len(u) - n + 1)}


def check(questions: Iterable[tuple[Any, str]], rows: Iterable[tuple[Any, str]], n: int = 8,
          threshold: float = 0.5) -> list[dict[str, Any]]:
    """Pairs (question id, row id) whose overlap reaches `threshold` of the question's n-grams."""
    index: dict[tuple[str, ...], set] = defaultdict(set)
    sizes: dict[Any, int] = {}
    texts: dict[Any, str] = {}
    for qid, text in questions:
        grams = ngrams(text, n)
        if grams:
            sizes[qid], texts[qid] = len(grams), text
            for g in grams:
                index[g].add(qid)
    flagged = []
    for row_id, text in rows:
        hits: dict[Any, int] = defaultdict(int)
        for g in ngrams(text, n):
            for qid in index.get(g, ()):
                hits[qid] += 1
        for qid, k in hits.items():
            overlap = k / sizes[qid]
            if overlap >= threshold:
                flagged.append({"question_id": qid, "row": row_id, "overlap": round(overlap, 3),
                                "question": texts[qid][:200], "row_text": text[:200]})
    return sorted(flagged, key=lambda f: -f["overlap"])
