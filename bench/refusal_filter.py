"""How well the answer filters do on the labelled evaluation set, per language and per case family.

    python bench/refusal_filter.py [--set data/filter_eval/answers.jsonl] [--show-errors]

Every row of the set is an answer (with its prompt where the language filter needs one) labelled
`refusal`, `wrong_language` or `ok`; the filters run as collect runs them, for ru, en and zh.
Refusal recall is the share of refusals dropped as refusals, precision the share of refusal drops
that were refusals; a false drop is an `ok` answer dropped for any reason.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from fabrika.data import filters as F

SET = Path(__file__).resolve().parents[1] / "data" / "filter_eval" / "answers.jsonl"
LANGUAGES = ("en", "ru", "zh")
EXPECTED = {"refusal": "refusal", "wrong_language": "language_mismatch", "ok": None}


def load(path: Path = SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def verdicts(rows: list[dict]) -> list[str | None]:
    return [F.drop_reason(r["text"], "stop", r["lang"], ["refusal", "language_mismatch"], LANGUAGES,
                          prompt=r.get("prompt")) for r in rows]


def score(rows: list[dict], got: list[str | None]) -> dict[str, dict[str, float]]:
    """{group: counts and rates} for 'all', each language ('lang:ru'), each family ('family:dialogue') and
    each split ('split:dev', written with the filter; 'split:holdout', written after it)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r, g in zip(rows, got):
        for group in ("all", f"lang:{r['lang']}", f"family:{r['family']}", f"split:{r.get('split', 'dev')}"):
            c = counts[group]
            c[r["label"]] += 1
            c["flagged_refusal"] += g == "refusal"
            c["refusal_caught"] += r["label"] == "refusal" and g == "refusal"
            c["wrong_language_caught"] += r["label"] == "wrong_language" and g == "language_mismatch"
            c["false_drop"] += r["label"] == "ok" and g is not None
    out = {}
    for group, c in counts.items():
        out[group] = {**c, "recall": c["refusal_caught"] / c["refusal"] if c["refusal"] else None,
                      "precision": c["refusal_caught"] / c["flagged_refusal"] if c["flagged_refusal"] else None,
                      "language_recall": (c["wrong_language_caught"] / c["wrong_language"]
                                          if c["wrong_language"] else None),
                      "false_drops": c["false_drop"] / c["ok"] if c["ok"] else None}
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=SET)
    ap.add_argument("--show-errors", action="store_true", help="Print every row the filters got wrong.")
    args = ap.parse_args()
    rows = load(args.set)
    t0 = time.perf_counter()
    got = verdicts(rows)
    took = time.perf_counter() - t0
    table = score(rows, got)
    print(f"{len(rows)} rows, {took:.2f} s ({1000 * took / len(rows):.1f} ms/row)\n")
    print("| group | refusals | recall | precision | ok | false drops | wrong language | caught |")
    print("|---|---|---|---|---|---|---|---|")
    for group in ["all"] + sorted(g for g in table if g != "all"):
        c = table[group]
        print(f"| {group} | {c.get('refusal', 0)} | {_pct(c['recall'])} | {_pct(c['precision'])} | {c.get('ok', 0)} | "
              f"{_pct(c['false_drops'])} | {c.get('wrong_language', 0)} | {_pct(c['language_recall'])} |")
    if args.show_errors:
        for r, g in zip(rows, got):
            if EXPECTED[r["label"]] != g:
                print(f"\n{r['id']} (label {r['label']}, got {g}): {r['text'][:200]!r}")


if __name__ == "__main__":
    main()
