"""collect: filters on real refusal texts in three languages, and seeded per-language sampling of a
Tagengo-shaped sample. (End-to-end tests against a served teacher are still to come: see the notes.)"""

from __future__ import annotations

from helpers import REPO

from fabrika.data import collect
from fabrika.data import filters as F

SAMPLE = REPO / "data" / "samples" / "tagengo_sample.parquet"

REAL_REFUSALS = {
    "en": ["I'm sorry, but I can't help with that.", "Sorry, I can't assist with that request.",
           "As an AI language model, I cannot provide medical advice."],
    "ru": ["Извините, но я не могу помочь с этим запросом.", "К сожалению, я не могу выполнить эту просьбу.",
           "Я не могу предоставить такую информацию."],
    "zh": ["抱歉，我无法帮助您完成这个请求。", "对不起，我不能提供这方面的信息。", "作为一个人工智能，我不能回答这个问题。"],
}
GOOD = {"en": "Paris is the capital of France, and it is known for its museums.",
        "ru": "Столица Франции — Париж. Этот город известен своими музеями.",
        "zh": "法国的首都是巴黎，这座城市以博物馆闻名。"}


def test_filters_on_real_texts():
    codes = ("en", "ru", "zh")
    for lang, texts in REAL_REFUSALS.items():
        for t in texts:
            assert F.drop_reason(t, "stop", lang, list(F.FILTERS), codes) == "refusal", t
        assert F.drop_reason(GOOD[lang], "stop", lang, list(F.FILTERS), codes) is None
    assert F.drop_reason(GOOD["en"], "stop", "ru", list(F.FILTERS), codes) == "language_mismatch"
    assert F.drop_reason(GOOD["en"], "length", "en", list(F.FILTERS), codes) == "truncated"
    assert F.drop_reason("  ", "stop", "en", list(F.FILTERS), codes) == "empty"
    assert F.language_code("Russian") == "ru" and F.language_code("zh-CN") == "zh"


def test_sampling_quotas_dedup_and_malformed(capsys):
    cfg = collect.CONFIG(source=str(SAMPLE), quota="ru=5,en=7,zh=20", teacher="x")
    picked, stats = collect.sample_prompts(cfg, str(SAMPLE))
    langs = [p["language"] for p in picked]
    assert langs.count("ru") == 5 and langs.count("en") == 7 and langs.count("zh") == 20
    assert stats["malformed_rows"] == 1 and "bad-1" in capsys.readouterr().out
    again, _ = collect.sample_prompts(cfg, str(SAMPLE))
    assert [p["id"] for p in again] == [p["id"] for p in picked]  # seeded, reproducible
    more = collect.CONFIG(source=str(SAMPLE), quota={"ru": 25}, teacher="x")
    picked, _ = collect.sample_prompts(more, str(SAMPLE))
    assert len(picked) == 20 and "only 20 ru prompts" in capsys.readouterr().out
