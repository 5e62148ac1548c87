"""Filters for distilled answers, each returning the reason a row is dropped (or None to keep it):
refusals, answers cut off by the length limit, empty answers, answers in another language than the
one the request expects, and duplicates.

Refusals are decided on the answer's own voice. The text is normalized first (NFKC, typographic
apostrophes and quotes folded), then what the answer quotes is set aside: quoted spans, titles,
code, block quotes, dialogue lines. What is left is split into sentences; the answer is a refusal
when one of its first two sentences refuses, or when refusing sentences make up most of it. So
"I’m sorry, but I can’t assist with that." is caught however its apostrophes are typed, while an
answer that explains, translates or stages a refusal ("HAL's line “I’m afraid I can’t do that”")
is kept. data/filter_eval holds the labelled set this is measured on (bench/refusal_filter.py).

The language filter asks which languages the answer may be in: the prompt's, plus the language a
translation request names and, for a request to correct or edit a text, that text's language.
Language detection is lingua's, restricted to the languages in play, which is both faster and more
accurate than detecting among all of them.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Literal, get_args

from fabrika.errors import FabrikaError

Filter = Literal["refusal", "truncated", "empty", "language_mismatch", "duplicate"]
FILTERS: tuple[Filter, ...] = get_args(Filter)

# --- normalization and the answer's own voice ------------------------------------------------

# Typographic apostrophes, quotes, guillemets, CJK corner and title brackets, folded to ASCII quotes
# (NFKC leaves them alone); after folding, every quoted span is delimited by " or '.
_FOLD = str.maketrans({**dict.fromkeys("‘’‚‛ʼʹ´′", "'"), **dict.fromkeys("“”„‟«»「」『』《》〈〉″", '"'), "ё": "е",
                       "Ё": "Е"})


def fold(text: str) -> str:
    """NFKC (full-width letters and punctuation, no-break spaces) with quotes and apostrophes folded."""
    return unicodedata.normalize("NFKC", text).translate(_FOLD)


_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.S)
_DOUBLE_QUOTED = re.compile(r'"[^"]{0,600}?"', re.S)
# a single-quoted span: the opening quote follows no letter, the closing one precedes none, and an
# apostrophe inside a word (can't) closes nothing
_SINGLE_QUOTED = re.compile(r"(?<!\w)'(?:[^'\n]|(?<=\w)'(?=\w)){1,300}?'(?!\w)")
_ITALIC = re.compile(r"(?<![*\w])\*(?![\s*])[^*\n]+?(?<![\s*])\*(?![*\w])|(?<!\w)_(?!\s)[^_\n]+?(?<!\s)_(?!\w)")
_SPEAKER = re.compile(r"^\s*([\w .'-]{1,24}):\s*\S")  # "Anna: ...", "MARK: ...", "小王: ..."
# labels that head the sections of an answer rather than the lines of a dialogue
_SECTIONS = {"note", "answer", "reason", "response", "important", "warning", "example", "output", "summary",
             "explanation", "result", "примечание", "ответ", "причина", "важно", "пример", "注意", "回答", "原因", "说明"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。!?;])|\n+")


def own_voice(text: str) -> str:
    """The folded answer without what it quotes: code, quoted spans and titles, italics, block quotes,
    headings, and dialogue (dash-led lines, or "Speaker: line" lines when the labels are not section
    labels like "Answer:"). An answer that is wholly a quotation is its own voice."""
    lines = [ln for ln in _CODE.sub(" ", fold(text)).split("\n") if not re.match(r"\s*(?:>|#|[—–]\s*\S)", ln)]
    speakers = [m.group(1).strip().lower() for m in map(_SPEAKER.match, lines) if m]
    if len(speakers) >= 2 and (len(set(speakers)) < len(speakers) or not set(speakers) & _SECTIONS):
        lines = [ln for ln in lines if not _SPEAKER.match(ln)]
    unquoted = "\n".join(lines)
    t = _ITALIC.sub('""', _SINGLE_QUOTED.sub('""', _DOUBLE_QUOTED.sub('""', unquoted)))
    if sum(ch.isalpha() for ch in t) < 12:  # nothing but a quotation: the quotation is the answer
        t = unquoted.replace('"', "")
    return t.replace("*", "").replace("__", "")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and sum(ch.isalnum() for ch in s) >= 2]


# --- refusal patterns ------------------------------------------------------------------------

_EN_VERBS = (r"(?:help(?!\s+(?:myself|but|feeling|thinking|wondering|it\b))|assist|provide|comply|fulfill?|create|"
             r"write|generate|engage|support|do\b|give|share|offer|continue|produce|answer|discuss|participate|"
             r"complete|process|access|browse|make|draft|comment|respond|translate|predict|tell you)")
_RU_VERBS = (r"(?:помочь|помогать|помогу|выполнить|предоставить|ответить|отвечать|дать|написать|обсуждать|"
             r"продолжить|оказать|сделать|создать|поделиться|участвовать|составить|рассказать|сообщить|"
             r"генерировать|назвать|поставить|придумать|узнать|разглашать|комментировать|писать|говорить|"
             r"разговаривать)")
_ZH_VERBS = (r"(?:提供|帮助|帮|回答|满足|协助|完成|参与|生成|撰写|写|讨论|处理|给出|告诉|执行|编写|支持|发表|"
             r"做|进行|获取|预测|诊断|回复|翻译|透露|分享|编造|创作|替|为你|为您|给你|给您)")

# Openings and phrases that mark a refusal in the answer's own voice, per language.
REFUSALS = {
    "en": [
        rf"\bI(?:'m| am| will| would)? ?(?:can't|cannot|can not|won't|will not|"
        rf"(?:am|'m) (?:not able|unable|not going) to|won't be able to|will not be able to|'d prefer not to|"
        rf"would prefer not to|(?:must|have to|need to) decline to)"
        rf"(?: \w+){{0,2}}? {_EN_VERBS}",
        r"\bI(?:'m| am)? (?:really |very |so |truly |terribly )?(?:sorry|afraid|apologi[sz]e)\b.{0,100}?"
        r"\b(?:can't|cannot|can not|unable|not able|won't|will not|must decline|not (?:going|allowed|permitted) to|"
        r"(?:don't|do not|'m not|am not) (?:feel )?comfortable)",
        r"^(?:sorry|my apologies|apologies|unfortunately|regrettably)\b[,.!—–:-]*\s*(?:but\s+)?"
        r"(?:I|that)(?:'m| am|'s| is)?\s*(?:can't|cannot|won't|unable|not able|not something|must decline)",
        r"\bI(?:'m| am)? (?:(?:going|have|need) to|must|'ll have to|will have to) (?:respectfully |politely )?"
        r"(?:decline|refuse)",
        r"\bI (?:don't|do not) (?:feel comfortable|think I (?:can|should)) (?:\w+ )?"
        r"(?:help|assist|writ|creat|provid|do)",
        r"\bI(?:'m| am) not comfortable (?:help|writ|creat|provid|do)",
        r"\bnot something I(?:'m| am)? ?(?:can|able to|will|'ll) (?:help|assist|do|provide)",
        r"\b(?:as|being) an? (?:AI|artificial intelligence|language model|AI language model|AI assistant|AI model)"
        r"(?: (?:developed|created|trained|made) by [\w .-]{1,20})?,? I\b",
        r"\bI(?:'m| am) (?:just |only |merely )?an? (?:text-based |large )?"
        r"(?:AI|language model|artificial intelligence)"
        r"(?: (?:assistant|model|language model|chatbot))?(?=[,.;!]| and\b| so\b| without\b)",
    ],
    "ru": [
        r"(?:^|[^\w])(?:я )?(?:пока )?не (?:могу|смогу|буду|стану|в состоянии|имею возможности|готова?)"
        rf"(?:\s+\S+){{0,3}}?\s+{_RU_VERBS}",
        r"^(?:извините|простите|прошу прощения|мне (?:очень )?жаль|к сожалению|увы|боюсь|sorry)[,.!…—–:\s-]*(?:но\s+)?"
        r"(?:я\s+)?(?:пока\s+)?(?:не|вынужден)\s",
        r"мне (?:некомфортно|неудобно) (?:писать|помогать|создавать|отвечать)|мне не стоит (?:помогать|отвечать|этого)",
        r"вынужден[а]? (?:отказать|отказаться)",
        r"(?:^|[^\w])(?:как|будучи) (?:у )?(?:ии|искусственн\w+ интеллект\w*|(?:нейросетев\w+ )?языков\w+ модел\w+|"
        r"нейросет\w+|ии-ассистент\w*|виртуальн\w+ ассистент\w*),? (?:я|у меня)",
        r"я (?:всего лишь|просто|лишь) (?:ии|языковая модель|искусственный интеллект|программа|нейросеть)",
        r"не люблю менять тему|лучше промолчу|давайте (?:поговорим|сменим тему)|"
        r"не умею отвечать на (?:такие|подобные)|у меня нет доступа к",
    ],
    "zh": [
        rf"我(?:暂时|目前|恐怕|并|真的)?(?:无法|不能|没办法|不可以|不会|不便|拒绝|不太愿意|不愿意)(?:为你|为您|给你|给您|替你|帮你|"
        rf"帮您|向你|向您)?(?:做出)?{_ZH_VERBS}",
        r"^(?:你好|您好)?[,\s]*(?:抱歉|对不起|很抱歉|非常抱歉|十分抱歉|不好意思|很遗憾|遗憾的是|sorry)[,!。.\s]*"
        r"[^。!?]{0,12}?(?:无法|不能|没办法|不便|帮不了|还没有?学会|不可以)",
        r"(?:这个|该|此)(?:问题|请求)我?(?:暂时|目前)?(?:无法|不能)|超出了我的(?:回答|能力|服务)?范围|换个话题|聊点别的",
        r"作为(?:一个|一名)?(?:AI|人工智能|AI语言模型|人工智能语言模型|语言模型|AI助手|人工智能助手|大语言模型|大模型)[,\s]*(?:我|没有)",
        r"我只是(?:一个)?(?:AI|人工智能|语言模型)",
    ],
}


@lru_cache(maxsize=64)
def _refusal_re(extra: tuple[str, ...]) -> re.Pattern:
    try:
        return re.compile("|".join(f"(?:{p})" for p in [*(p for ps in REFUSALS.values() for p in ps), *extra]),
                          re.I | re.M)
    except re.error as e:
        raise FabrikaError(f"collect.refusal_patterns: not a valid regular expression ({e})") from None


def is_refusal(text: str, extra: tuple[str, ...] = ()) -> bool:
    """Does the answer itself refuse? Its first two sentences, or most of it (by length), refuse."""
    pattern = _refusal_re(extra)
    parts = sentences(own_voice(text))
    if not parts:
        return False
    hits = [bool(pattern.search(s)) for s in parts]
    if any(hits[:2]):
        return True
    return sum(len(s) for s, h in zip(parts, hits) if h) * 2 >= sum(len(s) for s in parts)


# --- languages --------------------------------------------------------------------------------

LANGUAGE_NAMES = {  # Tagengo and many datasets name languages in English
    "english": "en", "russian": "ru", "chinese": "zh", "japanese": "ja", "korean": "ko", "german": "de",
    "french": "fr", "spanish": "es", "italian": "it", "portuguese": "pt", "dutch": "nl", "polish": "pl",
    "ukrainian": "uk", "turkish": "tr", "arabic": "ar", "hindi": "hi", "vietnamese": "vi", "thai": "th",
    "indonesian": "id", "czech": "cs", "swedish": "sv", "finnish": "fi", "danish": "da", "greek": "el",
    "hebrew": "he", "hungarian": "hu", "romanian": "ro", "persian": "fa", "bengali": "bn", "kazakh": "kk",
}
# How prompts in English, Russian and Chinese ask for an answer in a language: "in/into/to English",
# «на английский», «по-английски», 用英文 / 翻译成英文. {code: (English name, Russian stem, Chinese names)}
_LANGUAGE_WORDS = {"en": ("english", "английск", "英文|英语"), "ru": ("russian", "русск", "俄语|俄文"),
                   "zh": ("chinese|mandarin", "китайск", "中文|汉语|普通话"), "de": ("german", "немецк", "德语|德文"),
                   "fr": ("french", "французск", "法语|法文"), "es": ("spanish", "испанск", "西班牙语"),
                   "ja": ("japanese", "японск", "日语|日文"), "ko": ("korean", "корейск", "韩语|韩文"),
                   "uk": ("ukrainian", "украинск", "乌克兰语")}
_ASKED_IN = {code: re.compile(rf"\b(?:in|into|to)\s+(?:{en})\b|\bна\s+{ru}|\bпо-{ru}и|(?:用|成|为|译)\s*(?:{zh})", re.I)
             for code, (en, ru, zh) in _LANGUAGE_WORDS.items()}
_TRANSLATE = re.compile(r"translat|\b(?:say|answer|reply|respond|write|explain)\b|перев|по-\w+|(?:ответь|ответьте|"
                        r"напиши|напишите|как будет|как сказать)|翻译|译成|译为|怎么说|用.{1,4}(?:回答|写|说|回复)", re.I)
_TRANSLATION = re.compile(r"translat|how (?:do|would) (?:you|I) say|перев|как (?:будет|сказать)|翻译|译成|译为|怎么说", re.I)
_EDIT = re.compile(r"\b(?:correct|proofread|fix|edit|improve|polish|rewrite|grammar|spelling)|исправ|отредакт|"
                   r"провер|улучш|перепиш|граммати|改|纠正|润色|校对|语法|检查", re.I)


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


def expected_languages(prompt: str | None, prompt_lang: str, codes: tuple[str, ...]) -> set[str]:
    """The languages a right answer may be in: the prompt's; the language a request to translate or to
    answer in names; for a request to correct or edit a text, the text's own language."""
    accepted = {prompt_lang}
    if not prompt:
        return accepted
    if _TRANSLATE.search(prompt):
        accepted |= {code for code, asked in _ASKED_IN.items() if asked.search(prompt)}
    if _EDIT.search(prompt):
        for part in detector(codes).detect_multiple_languages_of(_CODE.sub(" ", prompt[:4000])):
            if part.end_index - part.start_index >= 20:
                accepted.add(part.language.iso_code_639_1.name.lower())
    return accepted


def language_mismatch(answer: str, prompt: str | None, prompt_lang: str, codes: tuple[str, ...]) -> bool:
    """Is the answer in none of the expected languages? Judged on the whole answer and on its prose
    outside quotations and code: a translation may be all quotation, an explanation of a foreign
    idiom mostly so, and either one being in an expected language keeps it."""
    accepted = expected_languages(prompt, prompt_lang, codes)
    codes = tuple(sorted(set(codes) | accepted))
    whole = detect(answer, codes)
    prose = own_voice(answer)
    texts = [whole] + ([detect(prose, codes)] if sum(ch.isalpha() for ch in prose) >= 20 else [])
    return all(t is not None and t not in accepted for t in texts)


def is_translation(answer: str, prompt: str | None, prompt_lang: str | None, codes: tuple[str, ...]) -> bool:
    """Is the answer a translation the prompt asked for, in a language other than the prompt's? Then its
    words are the source's, not its own: "Sorry, I can't come" translated is not a refusal."""
    if not prompt or not prompt_lang or not _TRANSLATION.search(prompt):
        return False
    targets = {code for code, asked in _ASKED_IN.items() if asked.search(prompt)} - {prompt_lang}
    return bool(targets) and detect(answer, tuple(sorted(set(codes) | targets))) in targets


def normalized(text: str) -> str:
    """For near-duplicate detection: case, punctuation, digits and whitespace removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalpha())


def drop_reason(answer: str, finish_reason: str, prompt_lang: str | None, filters: list[str],
                languages: tuple[str, ...], extra_refusals: tuple[str, ...] = (),
                prompt: str | None = None) -> str | None:
    if "empty" in filters and not answer.strip():
        return "empty"
    if "truncated" in filters and finish_reason == "length":
        return "truncated"
    if "refusal" in filters and is_refusal(answer, extra_refusals) and not is_translation(answer, prompt, prompt_lang,
                                                                                         languages):
        return "refusal"
    if "language_mismatch" in filters and prompt_lang and len(answer.strip()) >= 20:
        if language_mismatch(answer, prompt, prompt_lang, languages):
            return "language_mismatch"
    return None
