"""Writes judge_sample.jsonl: conversations that teach a tiny model the *format* of an MT-Bench judge.

The demo has no GPT-4 to judge with, so it fine-tunes its own tiny model on these rows and serves it
as the judge: every row is a real FastChat (or multilingual) judge prompt for an MT-Bench question,
with a short answer, followed by the verdict `Rating: [[5]]`. The grades it then gives
mean nothing; what the demo shows is that judging, parsing and scoring run end to end.

    python data/samples/make_judge_sample.py      # run from the repository root
"""

import json
from pathlib import Path

from fabrika.evaluate import judge as J
from fabrika.evaluate import mtbench as M

ANSWERS = {"en": ["Here is a short answer.", "I would start with the main point and add an example."],
           "ru": ["Вот короткий ответ.", "Я бы начал с главного и добавил пример."]}
VERDICT = "Rating: [[5]]"


def rows() -> list[dict]:
    out = []
    for bench, lang, kind in (("mt_bench", "en", "fastchat"), ("ru_mt_bench", "ru", "multilingual")):
        judges = J.single_judges("judge", J.load_prompts(kind))
        for q in [q for q in M.load_questions(bench)[0] if q["category"] in ("writing", "roleplay")][:8]:
            answer = {"choices": [{"turns": ANSWERS[lang]}]}
            for key in ("default", "default-mt"):
                messages = J.single_prompt(judges[key], q, answer, None)
                out.append({"messages": messages + [{"role": "assistant", "content": VERDICT}]})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("judge_sample.jsonl")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()), encoding="utf-8")
    print(f"{path}: {len(rows())} rows")
