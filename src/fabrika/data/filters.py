"""Filters for distilled answers, each returning the reason a row is dropped (or None to keep it):
refusals (multilingual patterns), answers cut off by the length limit, empty answers, answers in
another language than the prompt, and duplicates. Language detection is lingua's, restricted to the
languages in play, which is both faster and more accurate than detecting among all of them.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from fabrika.errors import FabrikaError

# Openings and phrases that mark a refusal, per language; matched case-insensitively near the start.
REFUSALS = {
    "en": [r"\bI(?:'m| am) (?:sorry|afraid)\b.{0,40}\b(?:can(?:no|')t|unable|not able)\b", r"^\s*sorry, (?:but )?I can",
           r"\bI can(?:no|')t (?:help|assist|provide|comply|do that|fulfill)", r"\bas an AI(?: language model)?\b",
           r"\bI(?:'m| am) (?:not able|unable) to (?:help|assist|provide|comply)", r"\bI won'?t (?:help|assist|provide)"],
    "ru": [r"\bизвините\b.{0,60}\bне (?:могу|смогу)", r"\bк сожалению\b.{0,60}\bне (?:могу|смогу)",
           r"\bя не могу (?:помочь|выполнить|предоставить|ответить)", r"\bкак (?:ии|искусственный интеллект|языковая модель)\b",
           r"\bне могу помочь с\b"],
    "zh": [r"抱歉.{0,20}(?:无法|不能)", r"对不起.{0,20}(?:无法|不能)", r"我(?:无法|不能)(?:提供|帮助|回答|满足|协助)",
           r"作为(?:一个)?(?:AI|人工智能|语言模型)"],
}
FILTERS = ("refusal", "truncated", "empty", "language_mismatch", "duplicate")

LANGUAGE_NAMES = {  # Tagengo and many datasets name languages in English
    "english": "en", "russian": "ru", "chinese": "zh", "japanese": "ja", "korean": "ko", "german": "de",
    "french": "fr", "spanish": "es", "italian": "it", "portuguese": "pt", "dutch": "nl", "polish": "pl",
    "ukrainian": "uk", "turkish": "tr", "arabic": "ar", "hindi": "hi", "vietnamese": "vi", "thai": "th",
    "indonesian": "id", "czech": "cs", "swedish": "sv", "finnish": "fi", "danish": "da", "greek": "el",
    "hebrew": "he", "hungarian": "hu", "romanian": "ro", "persian": "fa", "bengali": "bn", "kazakh": "kk",
}


def language_code(value: str) -> str:
    """An ISO 639-1 code from a code or an English language name ('Russian' → 'ru')."""
    v = str(value).strip().lower()
    if v in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[v]
    v = v.split("-")[0].split("_")[0]
    if len(v) == 2 and v.isalpha():
        return v
    raise FabrikaError(f"unknown language {value!r}; use an ISO 639-1 code like ru, en, zh or an English name")


def check_languages(codes: list[str]) -> None:
    from lingua import IsoCode639_1

    for c in codes:
        if not hasattr(IsoCode639_1, c.upper()):
            raise FabrikaError(f"quota: unknown language code {c!r} (ISO 639-1 codes such as ru, en, zh)")


@lru_cache(maxsize=8)
def detector(codes: tuple[str, ...]):
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    isos = [getattr(IsoCode639_1, c.upper()) for c in sorted(set(codes) | {"en"})]
    return LanguageDetectorBuilder.from_iso_codes_639_1(*isos).build()


def detect(text: str, codes: tuple[str, ...]) -> str | None:
    lang = detector(codes).detect_language_of(text[:2000])
    return lang.iso_code_639_1.name.lower() if lang else None


@lru_cache(maxsize=64)
def _refusal_re(extra: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join([p for ps in REFUSALS.values() for p in ps] + list(extra)), re.I | re.S)


def is_refusal(text: str, extra: tuple[str, ...] = ()) -> bool:
    return bool(_refusal_re(extra).search(text[:400]))


def normalized(text: str) -> str:
    """For near-duplicate detection: case, punctuation, digits and whitespace removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalpha())


def drop_reason(answer: str, finish_reason: str, prompt_lang: str | None, filters: list[str],
                languages: tuple[str, ...], extra_refusals: tuple[str, ...] = ()) -> str | None:
    if "empty" in filters and not answer.strip():
        return "empty"
    if "truncated" in filters and finish_reason == "length":
        return "truncated"
    if "refusal" in filters and is_refusal(answer, extra_refusals):
        return "refusal"
    if "language_mismatch" in filters and prompt_lang and len(answer.strip()) >= 20:
        got = detect(answer, languages)
        if got and got != prompt_lang:
            return "language_mismatch"
    return None
