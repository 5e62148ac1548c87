import pytest
from transformers import AutoTokenizer

from fabrika.artifacts import RunContext
from fabrika.errors import FabrikaError
from fabrika.models import tokenizer


def test_round_trip_in_three_languages_and_chat_template(tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    for text in ("To be, or not to be", "Мой дядя самых честных правил", "学而时习之，不亦说乎", "emoji 🙂 tab\tend"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\nHello<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    trained = tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert trained == "Hello<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"


def test_vocab_too_small_and_no_text(tmp_path):
    ctx = RunContext(stage="t", kind="tokenizer", stage_dir=tmp_path / "o", quiet=True)
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(FabrikaError, match="use at least 260"):
        tokenizer.run(tokenizer.CONFIG(paths=[str(tmp_path / "a.txt")], vocab_size=100), ctx)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(FabrikaError, match="no text"):
        tokenizer.run(tokenizer.CONFIG(paths=[str(tmp_path / "empty.txt")], vocab_size=300), ctx)



@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory, small_corpus):
    ctx = RunContext(stage="t", kind="tokenizer", stage_dir=tmp_path_factory.mktemp("qwen-style"), quiet=True)
    cfg = tokenizer.CONFIG(paths=[str(small_corpus)], vocab_size=600, pre_tokenizer="qwen2")
    return AutoTokenizer.from_pretrained(tokenizer.run(cfg, ctx).path)


def test_qwen2_pre_tokenizer_normalizes_and_splits_digits(qwen_style):
    ids = qwen_style("Cafe\u0301 1984", add_special_tokens=False)["input_ids"]
    assert ids == qwen_style("Caf\u00e9 1984", add_special_tokens=False)["input_ids"]  # NFC
    assert ids[-4:] == qwen_style.convert_tokens_to_ids(list("1984"))


@pytest.mark.parametrize("arch", ["llama", "mistral", "mixtral", "qwen2", "gpt2"])
def test_model_directories_load_back_the_tokenization(tiny_tokenizer, qwen_style, arch):
    """transformers loads a qwen2 directory with Qwen2Tokenizer whatever tokenizer_config.json says:
    a `qwen2` tokenizer passes for every architecture, the GPT-2-style one everywhere but qwen2."""
    from fabrika.models.presets import make_config

    tokenizer.check_loads_back(qwen_style, make_config(arch, "tiny", len(qwen_style)), "pretrain.model.arch")
    gpt2_style = AutoTokenizer.from_pretrained(tiny_tokenizer)
    config = make_config(arch, "tiny", len(gpt2_style))
    if arch != "qwen2":
        tokenizer.check_loads_back(gpt2_style, config, "pretrain.model.arch")
        return
    with pytest.raises(FabrikaError, match="pretrain.model.arch: a qwen2 model directory loads its tokenizer as "
                                           "Qwen2Tokenizer.*pre_tokenizer: qwen2"):
        tokenizer.check_loads_back(gpt2_style, config, "pretrain.model.arch")
