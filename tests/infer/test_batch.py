"""mode: batch against a batch-capable server on 127.0.0.1: chunks, batch prices, expired and failed
batches and error rows sent again per the configured policy, resuming a logged batch, cancelling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from batch_server import batch_server, submitted

from fabrika.infer import batch as B
from fabrika.infer.generation import GenerationParams
from fabrika.infer.client import RequestFailed

CONVS = [[{"role": "user", "content": f"Вопрос «{i}» — what’s {i}+{i}?"}] for i in range(5)]
PRICES = {"m": (1.0, 2.0)}  # 10 prompt + 20 completion tokens per answer: $0.00005 online


def reply(messages: list[dict]) -> str:
    return "answer to " + messages[-1]["content"]


def _ask(url: str, state: Path, tmp_path: Path, convs=CONVS, **batch) -> dict[int, object]:
    client = {"mode": "batch", "cache_dir": str(tmp_path / "cache"), "prices": PRICES, "max_retries": 0,
              "batch": {"poll_s": 0.01, **batch}}
    got: dict[int, object] = {}
    B.ask(f"openai:m@{url}", convs, GenerationParams(temperature=0.0, max_new_tokens=32), client, True,
          lambda i, r: got.__setitem__(i, r), state=state, labels=[f"q{i}" for i in range(len(convs))])
    return got


def test_chunks_answers_and_batch_price(tmp_path):
    log: list[dict] = []
    with batch_server(reply, log) as url:
        got = _ask(url, tmp_path / B.STATE, tmp_path, max_requests=2)
        assert [got[i][0].text for i in range(5)] == [reply(c) for c in CONVS]
        assert [len(e["custom_ids"]) for e in log if e["op"] == "create"] == [2, 2, 1]
        assert Counter(submitted(log)).most_common(1)[0][1] == 1
        assert all(got[i][0].cost == pytest.approx(0.000025) for i in range(5))  # half of the online price
        subs = B.read_state(tmp_path / "cache" / B.STATE)  # the log lives beside the response cache
        assert all(s.done and s.status == "completed" for s in subs.values())
        # the same call again is answered from the cache: nothing submitted
        n = len(log)
        again = _ask(url, tmp_path / B.STATE, tmp_path, max_requests=2)
        assert all(again[i][0].cached for i in range(5)) and not [e for e in log[n:] if e["op"] == "create"]


def test_expired_rows_go_to_a_new_batch(tmp_path):
    log: list[dict] = []
    with batch_server(reply, log, fates=["expire"]) as url:
        got = _ask(url, tmp_path / B.STATE, tmp_path)
    creates = [e["custom_ids"] for e in log if e["op"] == "create"]
    assert len(creates) == 2 and len(creates[1]) == 3 and set(creates[1]) < set(creates[0])
    assert [got[i][0].text for i in range(5)] == [reply(c) for c in CONVS]


def test_failed_batch_and_error_rows_are_retried_online(tmp_path):
    log: list[dict] = []
    flaky = CONVS[1][-1]["content"]
    with batch_server(reply, log, fates=["fail"]) as url:
        got = _ask(url, tmp_path / B.STATE, tmp_path, retry="online")
    assert [got[i][0].text for i in range(5)] == [reply(c) for c in CONVS]
    assert len([e for e in log if e["op"] == "create"]) == 1 and len([e for e in log if e["op"] == "chat"]) == 5
    log.clear()
    with batch_server(reply, log, error_if=lambda m: m[-1]["content"] == flaky) as url:
        got = _ask(url, tmp_path / "other.jsonl", tmp_path / "fresh", retry="online")
    assert [e["messages"][-1]["content"] for e in log if e["op"] == "chat"] == [flaky]
    assert got[1][0].text == reply(CONVS[1])


def test_retry_none_and_rounds_spent_fail_the_request(tmp_path):
    log: list[dict] = []
    with batch_server(reply, log, error_if=lambda m: "3" in m[-1]["content"]) as url:
        got = _ask(url, tmp_path / B.STATE, tmp_path, retry="none")
        assert isinstance(got[3], RequestFailed) and "500" in str(got[3])
        assert [got[i][0].text for i in (0, 1, 2, 4)] == [reply(CONVS[i]) for i in (0, 1, 2, 4)]
        got = _ask(url, tmp_path / B.STATE, tmp_path, retry="batch", max_rounds=2)
    assert isinstance(got[3], RequestFailed)
    assert Counter(submitted(log))[next(c for c in submitted(log) if c.startswith("q3@"))] == 3


def test_cancel_stops_the_batches_in_flight(tmp_path):
    log: list[dict] = []
    state = tmp_path / "stage" / B.STATE
    with batch_server(reply, log, polls=10 ** 6) as url:
        import threading

        result: dict = {}
        t = threading.Thread(target=lambda: result.update(_ask(url, state, tmp_path)))
        t.start()
        while not [e for e in log if e["op"] == "retrieve"]:
            t.join(0.01)
        assert "1 batch in flight" in B.in_flight_line(tmp_path)
        assert B.cancel(tmp_path) == ["batch_1"]
        t.join(30)
    assert all(isinstance(r, RequestFailed) and "cancelled" in str(r) for r in result.values()) and len(result) == 5
    assert B.in_flight_line(tmp_path) == ""
    assert len([e for e in log if e["op"] == "create"]) == 1


def test_budget_submits_one_batch_at_a_time_and_stops_when_spent(tmp_path):
    from fabrika.infer.client import JobStopped

    log: list[dict] = []
    got: dict[int, object] = {}
    client = {"mode": "batch", "cache_dir": str(tmp_path / "cache"), "prices": PRICES, "budget_usd": 0.00004,
              "batch": {"poll_s": 0.01, "max_requests": 2}}
    with batch_server(reply, log) as url, pytest.raises(JobStopped, match="budget"):
        B.ask(f"openai:m@{url}", CONVS, GenerationParams(temperature=0.0, max_new_tokens=32), client, True,
              lambda i, r: got.__setitem__(i, r), state=tmp_path / B.STATE, labels=[f"q{i}" for i in range(5)])
    assert len([e for e in log if e["op"] == "create"]) == 1  # 2 answers at $0.000025 each spent the budget
    assert sorted(got) == [0, 1]


def test_a_local_model_in_batch_mode_is_a_clear_error(tmp_path):
    from fabrika.errors import FabrikaError

    with pytest.raises(FabrikaError, match="mode: batch needs an API model"):
        B.ask("hf:some/model", CONVS, GenerationParams(), {"mode": "batch"}, True, lambda i, r: None,
              state=tmp_path / B.STATE, labels=["a"] * 5)


def test_input_files_stay_under_max_bytes(tmp_path):
    from fabrika.errors import FabrikaError

    log: list[dict] = []
    line = len(B.custom_id("q0", "k" * 64)) + 250  # about one request line
    with batch_server(reply, log) as url:
        got = _ask(url, tmp_path / B.STATE, tmp_path, max_bytes=2 * line)
        assert [got[i][0].text for i in range(5)] == [reply(c) for c in CONVS]
        assert [len(e["custom_ids"]) for e in log if e["op"] == "create"] == [2, 2, 1]
        assert all(e["bytes"] <= 2 * line for e in log if e["op"] == "upload")
        with pytest.raises(FabrikaError, match="over the 100 bytes a batch may hold"):
            _ask(url, tmp_path / "other" / B.STATE, tmp_path / "other", max_bytes=100)
