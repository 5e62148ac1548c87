"""The answer filters on the labelled evaluation set (data/filter_eval): refusal recall and false drops
held to floors per language, and the cases the issue names one by one."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
from helpers import REPO

from fabrika.data import collect
from fabrika.data import filters as F
from fabrika.errors import FabrikaError

sys.path.insert(0, str(REPO / "bench"))
import refusal_filter as bench  # noqa: E402

CODES = ("en", "ru", "zh")


@pytest.fixture(scope="module")
def scored():
    rows = bench.load()
    return rows, bench.score(rows, bench.verdicts(rows))


def test_the_set_is_large_multilingual_and_labelled(scored):
    rows, _ = scored
    assert len(rows) >= 300 and len({r["id"] for r in rows}) == len(rows)
    assert {r["label"] for r in rows} == {"refusal", "ok", "wrong_language"}
    per_lang = Counter(r["lang"] for r in rows)
    assert set(per_lang) == set(CODES) and min(per_lang.values()) >= 90
    assert sum(len(r["text"]) > 250 for r in rows) >= 30  # long answers, not one-liners only


def test_floors_per_language(scored):
    _, table = scored
    for group in ["all", *(f"lang:{c}" for c in CODES)]:
        assert table[group]["recall"] >= 0.98, (group, table[group])
        assert table[group]["false_drops"] <= 0.01, (group, table[group])
    assert table["all"]["precision"] >= 0.98 and table["all"]["language_recall"] >= 0.98


def drop(text: str, lang: str = "en", prompt: str | None = None, extra: tuple[str, ...] = ()) -> str | None:
    return F.drop_reason(text, "stop", lang, list(F.FILTERS), CODES, extra, prompt=prompt)


def test_refusals_in_the_answers_own_voice():
    assert drop("I’m sorry, but I can’t assist with that.") == "refusal"  # GPT-4o, typographic apostrophes
    assert drop("## Answer\n\nＩ＇ｍ sorry, but I can't help with that.") == "refusal"
    assert drop("抱歉，我无法协助满足该请求。", "zh") == "refusal"
    assert drop("Извините, но я не могу помочь с «этим».", "ru") == "refusal"
    assert drop("“I’m sorry, but I can’t help with that.”") == "refusal"  # wholly quoted: still its own words
    assert drop("**Answer:** I can't help with that.\n**Reason:** it would be illegal.") == "refusal"
    assert drop("HAL's line “I’m sorry, Dave. I’m afraid I can’t do that.” is famous.") is None
    assert drop("— Извини, не могу, — ответила она.\n— Почему? — спросил он.", "ru") is None
    assert drop("Извините, я не могу прийти завтра.", "en", prompt="Translate into Russian: Sorry, I can't come "
                "tomorrow.") is None  # the translation asked for, not a refusal by the teacher


def test_user_patterns_stay_and_bad_ones_are_named():
    assert drop("Let us change the subject, dear user.", extra=(r"^let us change the subject",)) == "refusal"
    with pytest.raises(FabrikaError, match="refusal_patterns: not a valid regular expression"):
        drop("Fine.", extra=("(unclosed",))
    with pytest.raises(ValueError, match="'.unclosed' is not a valid regular expression"):
        collect.CONFIG(source="x", teacher="t", refusal_patterns=["(unclosed"])


def test_language_expected_by_the_request():
    fixed = "Here is the corrected paragraph: \"Last summer I traveled to Canada with my family.\""
    assert drop(fixed, "zh", prompt="请帮我修改这段英文：Last summer I travel to Canada with my family.") is None
    assert drop("Москва — столица России и крупнейший город страны.", "zh",
                prompt="把这句话翻译成俄语：莫斯科是俄罗斯的首都和最大的城市。") is None
    drift = "The Great Wall of China is over 21,000 kilometers long and was mostly built in the Ming dynasty."
    assert drop(drift, "zh", prompt="长城有多长？") == "language_mismatch"
    assert drop(drift, "zh") == "language_mismatch"
    essay = "Русская литература XIX века подарила миру Пушкина, Толстого, Достоевского и Чехова."
    assert drop(essay, "en", prompt="Write a short essay about Russian literature.") == "language_mismatch"
    assert drop(essay, "en", prompt="Write a short essay about Russian literature in Russian.") is None
