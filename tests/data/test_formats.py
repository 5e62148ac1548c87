import pytest

from fabrika.data.formats import RowError, check_conversation, convert_rows, detect_format, to_messages


def test_sharegpt_tagengo_row():
    row = {"conversation_id": "x", "language": "Russian", "response": ["..."],
           "conversations": [{"from": "human", "value": "Привет"}, {"from": "gpt", "value": "Здравствуйте"}]}
    assert detect_format(row) == "sharegpt"
    assert to_messages(row) == [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуйте"}]


def test_alpaca_with_and_without_input():
    assert to_messages({"instruction": "Add", "input": "1+1", "output": "2"}) == [
        {"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"})[0]["content"] == "Hi"


def test_chatml_text_and_messages_and_prompt():
    text = "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert [m["role"] for m in to_messages({"text": text})] == ["system", "user", "assistant"]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_messages({"messages": msgs}) == msgs
    assert to_messages({"prompt": "q"}) == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("msgs, reason", [
    ([], "empty"),
    ([{"role": "assistant", "content": "a"}], "out of order"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "out of order"),
    ([{"role": "user", "content": "q"}], "no assistant"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}], "empty"),
])
def test_bad_conversations(msgs, reason):
    with pytest.raises(RowError, match=reason):
        check_conversation(msgs)


def test_convert_rows_reports_bad_rows_with_ids():
    rows = [(0, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            (1, {"conversations": [{"from": "alien", "value": "x"}]}),
            (2, {"foo": 1})]
    good, bad = convert_rows(rows)
    assert len(good) == 1 and [i for i, _ in bad] == [1, 2]
    assert "alien" in bad[0][1] and "foo" in bad[1][1]
