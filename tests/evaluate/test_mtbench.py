"""MT-Bench end to end with a real judge: a tiny model fine-tuned to grade in FastChat's format and
served on loopback, reached over HTTP through fabrika's client. Plus FastChat prompt fidelity,
parsing, aggregation, pairwise logic and reading FastChat's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from helpers import REPO, run_cli, run_fabrika, write_jsonl

from fabrika.artifacts import RunContext, read_jsonl
from fabrika.errors import FabrikaError
from fabrika.evaluate import judge as J
from fabrika.evaluate import mtbench as M
from fabrika.evaluate import stage
from fabrika.evaluate.scores import summarise

UPSTREAM = Path(__file__).parent / "fastchat"  # FastChat's own judge_prompts.jsonl, unmodified


@pytest.fixture(scope="session")
def judge_model(tmp_path_factory):
    """A tiny Llama fine-tuned to answer any judge prompt with a verdict and `[[7]]`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fabrika.train import sft

    work = tmp_path_factory.mktemp("judge")
    from helpers import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (CORPUS / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    prompts = J.load_prompts("fastchat")
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([text, json.dumps(prompts)], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(work / "base")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096,
                                 tie_word_embeddings=True)).save_pretrained(work / "base")
    questions = M.load_questions("mt_bench")[0][:6]
    rows = []
    for q in questions:
        ans = {"choices": [{"turns": ["An answer.", "Another answer."]}]}
        for key in ("default", "default-mt"):
            msgs = J.single_prompt(J.single_judges("j", prompts)[key], q, ans, None)
            rows.append({"messages": msgs + [{"role": "assistant", "content": "Helpful enough. Rating: [[7]]"}]})
    data = write_jsonl(work / "judge.jsonl", rows)
    cfg = sft.CONFIG(model=str(work / "base"), data=str(data), method="full", max_length=4096, eval_fraction=0,
                     batching="packed",
                     train={"max_steps": 40, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0,
                            "eval_steps": None, "save_steps": 1000})
    return sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=work / "sft", quiet=True)).path


@pytest.fixture(scope="session")
def judge_server(judge_model):
    from fabrika.infer.local import serve_in_background

    with serve_in_background(f"hf:{judge_model}", name="judge") as s:
        yield s


def test_prompts_are_fastchats_byte_for_byte():
    """Built independently from FastChat's own template file, as its run_judge_single does."""
    upstream = {json.loads(l)["name"]: json.loads(l) for l in
                (UPSTREAM / "judge_prompts.jsonl").read_text().splitlines() if l.strip()}
    questions, refs, _ = M.load_questions("mt_bench")
    math_q = next(q for q in questions if q["category"] == "math")
    answer = {"choices": [{"turns": ["first {braces} answer", "second"]}]}
    judges = J.single_judges("gpt-4", J.load_prompts("fastchat"))
    ref = refs[math_q["question_id"]]
    msgs = J.single_prompt(J.pick(judges, "math", 2), math_q, answer, ref)
    tpl = upstream["single-math-v1-multi-turn"]
    expected = tpl["prompt_template"].format(question_1=math_q["turns"][0], question_2=math_q["turns"][1],
                                             answer_1="first {braces} answer", answer_2="second",
                                             ref_answer_1=ref["choices"][0]["turns"][0],
                                             ref_answer_2=ref["choices"][0]["turns"][1])
    assert msgs == [{"role": "system", "content": tpl["system_prompt"]}, {"role": "user", "content": expected}]
    writing = next(q for q in questions if q["category"] == "writing")
    m1 = J.single_prompt(J.pick(judges, "writing", 1), writing, answer, None)
    assert m1[1]["content"] == upstream["single-v1"]["prompt_template"].format(
        question=writing["turns"][0], answer="first {braces} answer")


def test_rating_parsing_and_pairs():
    assert J.parse_rating("Rating: [[8]]") == 8 and J.parse_rating("[[7.5]] ok") == 7.5
    assert J.parse_rating("I give it [6]") == 6 and J.parse_rating("no score") == -1
    assert J.parse_rating("[[99999999999999999999999]]") == -1 and J.parse_rating("[[-3]]") == -1
    assert J.parse_winner("[[B]]") == "B" and J.parse_winner("[[C]]") == "tie" and J.parse_winner("?") == "error"
    assert J.combine_pair("A", "B") == "model_1" and J.combine_pair("A", "A") == "tie"


def test_all_packaged_benches_load():
    counts = {b: len(M.load_questions(b)[0]) for b in M.BENCHES}
    assert counts == {"mt_bench": 80, "ru_mt_bench": 80, "ru_mt_bench_50": 50, "zh_mt_bench": 80}
    assert len(M.load_questions("ru_mt_bench")[1]) >= 40 and len(M.load_questions("zh_mt_bench")[1]) == 80


def test_scores_like_show_result():
    rows = [{"question_id": 81, "model": "a", "score": 8, "turn": 1}, {"question_id": 81, "model": "a", "score": 6, "turn": 2},
            {"question_id": 82, "model": "a", "score": -1, "turn": 1}, {"question_id": 82, "model": "a", "score": 9, "turn": 2}]
    s = summarise(rows, {81: "writing", 82: "roleplay"})["a"]
    assert s["turn1"] == 8 and s["turn2"] == 7.5 and s["overall"] == pytest.approx(23 / 3) and s["failed"] == 1
    assert s["by_category"] == {"roleplay": 9, "writing": 7}


def test_mtbench_stage_with_served_judge_resume_and_show(tmp_path, chat_model, judge_server):
    cfg = stage.CONFIG(model=f"hf:{chat_model}", model_id="tiny",
                       mtbench={"bench": ["mt_bench", "ru_mt_bench_50"], "judge": f"openai:judge@{judge_server.url}",
                                "questions": 3, "max_new_tokens": 16, "client": {"concurrency": 4}})
    ctx = RunContext(stage="evaluate", kind="evaluate", stage_dir=tmp_path / "ev", quiet=True)
    art = stage.run(cfg, ctx)
    res = json.loads(art.path.read_text())
    en = res["mtbench"]["mt_bench"]
    assert en["n"] == 6 and en["overall"] == 7 and en["prompts"] == "fastchat"
    assert res["mtbench"]["ru_mt_bench_50"]["prompts"] == "multilingual"
    answers = list(read_jsonl(tmp_path / "ev" / "mt_bench" / "model_answer" / "tiny.jsonl"))
    assert len(answers) == 3 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    judgments = tmp_path / "ev" / "mt_bench" / "model_judgment" / "judge_single.jsonl"
    rows = list(read_jsonl(judgments))
    assert {(r["question_id"], r["turn"]) for r in rows} == {(q, t) for q in (81, 82, 83) for t in (1, 2)}
    assert rows[0]["judge"][1] in ("single-v1", "single-v1-multi-turn") and "[[7]]" in rows[0]["judgment"]
    assert (tmp_path / "ev" / "mtbench.png").exists() and "published" in (tmp_path / "ev" / "results.md").read_text()

    # resume: lose two judgments (a kill mid-way), run again: only those two are asked again
    lines = judgments.read_text().splitlines()
    judgments.write_text("\n".join(lines[:-2]) + "\n")
    (tmp_path / "ev" / "manifest.json").unlink()
    stage.run(cfg, ctx)
    assert len(list(read_jsonl(judgments))) == 6

    r = run_cli("eval", "show", str(judgments))
    assert r.returncode == 0 and "tiny" in r.stdout and "7.00" in r.stdout


def test_show_reads_fastchat_files_and_rejects_others(tmp_path):
    fastchat = write_jsonl(tmp_path / "gpt-4_single.jsonl", [
        {"question_id": 81, "model": "vicuna", "judge": ["gpt-4", "single-v1"], "user_prompt": "...", "judgment": "[[9]]",
         "score": 9, "turn": 1, "tstamp": 1.0},
        {"question_id": 81, "model": "vicuna", "judge": ["gpt-4", "single-v1-multi-turn"], "user_prompt": "...",
         "judgment": "[[5]]", "score": 5, "turn": 2, "tstamp": 1.0}])
    fastchat_2 = write_jsonl(tmp_path / "other_single.jsonl", [
        {"question_id": 111, "model": "alpaca", "judge": ["gpt-4", "single-v1"], "user_prompt": "...",
         "judgment": "[[4]]", "score": 4, "turn": 1, "tstamp": 1.0}])
    r = run_fabrika("eval", "show", str(fastchat), str(fastchat_2))
    assert r.returncode == 0 and "9.00" in r.stdout and "5.00" in r.stdout and "7.00" in r.stdout
    by_category = r.stdout[r.stdout.index("by category"):]  # the table the command's help promises
    writing = next(line for line in by_category.splitlines() if "writing" in line)
    math = next(line for line in by_category.splitlines() if "math" in line)  # question 111 is math
    assert "7.00" in writing and "—" in writing and "4.00" in math
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1}])
    r = run_cli("eval", "show", str(bad))
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr


def test_judging_existing_answers_and_bad_input(tmp_path, judge_server):
    answers = write_jsonl(tmp_path / "fastchat_answers.jsonl", [
        {"question_id": 81, "answer_id": "x", "model_id": "someone", "choices": [{"index": 0, "turns": ["a", "b"]}],
         "tstamp": 0}])
    cfg = stage.CONFIG(mtbench={"bench": "mt_bench", "judge": f"openai:judge@{judge_server.url}", "questions": 2,
                                "answers": str(answers)})
    art = stage.run(cfg, RunContext(stage="ev", kind="evaluate", stage_dir=tmp_path / "o", quiet=True))
    assert json.loads(art.path.read_text())["mtbench"]["mt_bench"]["n"] == 2
    with pytest.raises(FabrikaError, match="neither a packaged bench"):
        M.load_questions("nope_bench")
    (tmp_path / "broken.jsonl").write_text('{"question_id": 1}\n')
    with pytest.raises(FabrikaError, match="broken.jsonl:1"):
        M.load_answers(tmp_path / "broken.jsonl")


def test_perplexity_hf_and_gguf_agree(tmp_path, chat_model):
    from fabrika.evaluate.perplexity import perplexity
    from fabrika.export.gguf import convert
    from fabrika.models.reference import reference_placement

    text = tmp_path / "t.txt"
    text.write_text((REPO / "data" / "corpus" / "en" / "tinyshakespeare.txt").read_text()[:3000])
    hf = perplexity(f"hf:{chat_model}", str(text), context=128, max_tokens=600)
    convert(chat_model, tmp_path / "m.gguf", "f32")
    gg = perplexity(f"gguf:{tmp_path / 'm.gguf'}", str(text), context=128, max_tokens=600, tokenizer_dir=str(chat_model))
    assert hf["tokens"] == gg["tokens"] and gg["ppl"] == pytest.approx(hf["ppl"], rel=1e-3)
    assert {k: hf[k] for k in ("device", "dtype")} == reference_placement().as_dict()  # fp32 on CPU, bf16 on a GPU


def test_contamination_flags_copied_questions(tmp_path):
    from fabrika.evaluate.contamination import check

    q = M.load_questions("mt_bench")[0][0]["turns"][0]
    zh = M.load_questions("zh_mt_bench")[0][0]["turns"][0]
    flagged = check([("q1", q), ("z1", zh)], [(0, "unrelated text " * 20), (1, "Please: " + q), (2, zh[:-3])], n=8)
    assert {(f["question_id"], f["row"]) for f in flagged} == {("q1", 1), ("z1", 2)}


def test_harness_on_a_local_task(tmp_path, chat_model):
    from fabrika.evaluate.harness import run_harness

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"{i} plus {i} is", "choices": [str(2 * i), "x"], "answer": 0}
                                              for i in range(6)])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_arith.yaml").write_text(
        f"task: tiny_arith\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    res = run_harness(str(chat_model), ["tiny_arith"], include_path=str(tmp_path / "tasks"))
    assert 0 <= res["tiny_arith"]["acc"] <= 1
    with pytest.raises(FabrikaError, match="unknown task"):
        run_harness(str(chat_model), ["no_such_task_xyz"], include_path=str(tmp_path / "tasks"))


def _pair_verdict(messages: list[dict]) -> str:
    """A judge with a known rule: the side whose answer says WINNER wins; neither: a tie."""
    import re

    text = messages[-1]["content"]
    a, b = re.split(r"The Start of Assistant B's", text, maxsplit=1)
    return "[[A]]" if "WINNER" in a else "[[B]]" if "WINNER" in b else "[[C]]"


def test_pairwise_against_an_answer_file_both_orders_and_resume(tmp_path, chat_model):
    from helpers import scripted_server

    questions = M.load_questions("mt_bench")[0][:2]
    baseline = write_jsonl(tmp_path / "ref.jsonl", [
        {"question_id": q["question_id"], "answer_id": "x", "model_id": "reference", "tstamp": 0,
         "choices": [{"index": 0, "turns": ["WINNER first", "WINNER second"] if i == 0 else ["plain", "plain"]}]}
        for i, q in enumerate(questions)])
    calls = []
    with scripted_server(lambda m: calls.append(1) or _pair_verdict(m)) as judge:
        cfg = stage.CONFIG(model=f"hf:{chat_model}", model_id="tiny",
                           mtbench={"bench": "mt_bench", "judge": f"openai:j@{judge}", "questions": 2,
                                    "max_new_tokens": 8, "mode": "pairwise", "baseline": str(baseline)})
        ctx = RunContext(stage="evaluate", kind="evaluate", stage_dir=tmp_path / "ev", quiet=True)
        res = json.loads(stage.run(cfg, ctx).path.read_text())["mtbench"]["mt_bench"]["pairwise"]
        assert res == {"baseline": "reference", "wins": 0, "losses": 2, "ties": 2, "errors": 0, "win_rate": 0.25}
        assert len(calls) == 8  # 2 questions x 2 turns x both orders
        pair_file = tmp_path / "ev" / "mt_bench" / "model_judgment" / "j_pair.jsonl"
        rows = list(read_jsonl(pair_file))
        assert {r["g1_winner"] for r in rows if r["question_id"] == questions[0]["question_id"]} == {"model_2"}
        assert rows[0]["judge"][1].startswith("pair-v2") and "g2_user_prompt" in rows[0]
        (tmp_path / "ev" / "manifest.json").unlink()
        stage.run(cfg, ctx)  # everything journaled: no judge call repeated
        assert len(calls) == 8
    r = run_cli("eval", "show", "--pairwise", str(pair_file))
    assert r.returncode == 0 and "tiny vs reference" in r.stdout and "25%" in r.stdout
    with pytest.raises(Exception, match="set baseline"):
        stage.CONFIG(mtbench={"bench": "mt_bench", "mode": "pairwise"})


def test_leaderboard_across_result_folders(tmp_path):
    for run, model, score in (("run1", "alpha", 6), ("run2", "beta", 9)):
        d = tmp_path / run / "evaluate" / "mt_bench" / "model_judgment"
        d.mkdir(parents=True)
        write_jsonl(d / "gpt-4o_single.jsonl", [{"question_id": 81, "model": model, "judge": ["gpt-4o", "single-v1"],
                                                 "user_prompt": "", "judgment": f"[[{score}]]", "score": score,
                                                 "turn": t, "tstamp": 0} for t in (1, 2)])
    r = run_cli("eval", "leaderboard", str(tmp_path), "--out", str(tmp_path / "board.md"))
    assert r.returncode == 0, r.stderr
    board = (tmp_path / "board.md").read_text()
    rows = [line for line in board.splitlines() if line.startswith("| ") and "model" not in line]
    names = [line.split(" | ")[1] for line in rows]
    assert names[0] == "beta" and names.index("alpha") > names.index("gpt-3.5-turbo (published)")
    assert run_cli("eval", "leaderboard", str(tmp_path / "nothing")).returncode == 2


def test_failed_pairwise_requests_are_judged_again(tmp_path, chat_model):
    from helpers import scripted_server

    questions = M.load_questions("mt_bench")[0][:1]
    baseline = write_jsonl(tmp_path / "ref.jsonl", [{"question_id": questions[0]["question_id"], "answer_id": "x",
                                                     "model_id": "reference", "tstamp": 0,
                                                     "choices": [{"index": 0, "turns": ["WINNER", "WINNER"]}]}])
    with scripted_server(_pair_verdict) as judge, FaultProxy(judge.removesuffix("/v1"), ["500"] * 4) as flaky:
        cfg = stage.CONFIG(model=f"hf:{chat_model}", model_id="tiny",
                           mtbench={"bench": "mt_bench", "judge": f"openai:j@{flaky.url}", "questions": 1,
                                    "max_new_tokens": 8, "mode": "pairwise", "baseline": str(baseline),
                                    "client": {"max_retries": 0, "concurrency": 1}})
        ctx = RunContext(stage="evaluate", kind="evaluate", stage_dir=tmp_path / "ev", quiet=True)
        with pytest.raises(FabrikaError, match="pairwise judging: 4 requests failed"):
            stage.run(cfg, ctx)
        pair_file = tmp_path / "ev" / "mt_bench" / "model_judgment" / "j_pair.jsonl"
        assert not list(read_jsonl(pair_file))  # no comparison recorded from a failed request
        res = json.loads(stage.run(cfg, ctx).path.read_text())["mtbench"]["mt_bench"]["pairwise"]
        assert res["losses"] == 2 and res["errors"] == 0


def test_mtbench_cli_names_the_model_shows_progress_and_skips_what_does_not_fit(tmp_path, chat_model):
    """As a new user runs it: no --model-id, a question too long for the model's context, a terminal
    that wants to see progress (and a -q run that does not)."""
    from helpers import scripted_server

    long = "word " * 3000  # more tokens than the tiny model's 2048 positions
    first, second = M.load_questions("mt_bench")[0][:2]
    write_jsonl(tmp_path / "my_bench.jsonl", [
        first, {**second, "turns": [long, "and then?"]},
        {"question_id": 999, "category": "writing", "turns": ["Say hi.", long]}])
    with scripted_server(lambda m: "Fine. Rating: [[6]]") as judge:
        args = ["eval", "mtbench", "--model", f"hf:{chat_model}", "--bench", str(tmp_path / "my_bench.jsonl"),
                "--judge", f"openai:j@{judge}", "--set", "mtbench.max_new_tokens=8"]
        r = run_fabrika(*args, "--out", str(tmp_path / "ev"))
        assert r.returncode == 0, r.stderr[-3000:]
        quiet = run_fabrika(*args, "--out", str(tmp_path / "ev-quiet"), "-q")
        assert quiet.returncode == 0, quiet.stderr[-3000:]
    bench = tmp_path / "ev" / "my_bench"
    assert [p.name for p in (bench / "model_answer").iterdir()] == [f"{chat_model.name}.jsonl"]
    assert {j["model"] for j in read_jsonl(bench / "model_judgment" / "j_single.jsonl")} == {chat_model.name}
    out = r.stdout + r.stderr
    assert "question 82 skipped" in out and "question 999 turn 2 skipped" in out
    assert "2048" in out and "mtbench.max_new_tokens" in out  # the limit, and the setting to change
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["mtbench"]["my_bench"]
    assert res["skipped"] == [{"question_id": 82, "turn": 1}, {"question_id": 82, "turn": 2},
                              {"question_id": 999, "turn": 2}]
    assert res["n"] == 3 and res["overall"] == 6
    assert "| 3 | 0 | 3 |" in r.stdout  # graded, failed, skipped in the printed results
    assert "┃ metric" not in r.stdout  # results.md only, not the generic metrics table before it too
    assert "answers" in r.stdout and "3/3" in r.stdout and "requests" in r.stdout  # both bars, with ETA
    assert "answers" not in quiet.stdout and "requests" not in quiet.stdout


def test_mtbench_in_a_pipeline_shows_progress_and_names_the_model(tmp_path, chat_model):
    import yaml
    from helpers import scripted_server

    with scripted_server(lambda m: "Rating: [[5]]") as judge:
        spec = {"name": "p", "run_dir": str(tmp_path / "runs" / "p"),
                "stages": {"evaluate": {"model": f"hf:{chat_model}",
                                        "mtbench": {"bench": "mt_bench", "judge": f"openai:j@{judge}",
                                                    "questions": 2, "max_new_tokens": 8}}}}
        (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(spec))
        r = run_fabrika("run", str(tmp_path / "pipe.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mt_bench: answers" in r.stdout and "2/2" in r.stdout and "requests" in r.stdout
    answers = tmp_path / "runs" / "p" / "evaluate" / "mt_bench" / "model_answer"
    assert [p.name for p in answers.iterdir()] == [f"{chat_model.name}.jsonl"]


def test_an_endpoint_refusing_a_long_prompt_skips_that_question_only(tmp_path, server):
    """The model behind an OpenAI-compatible endpoint (here `fabrika serve`): its context error for one
    prompt skips that question; the others are answered, none twice."""
    from helpers import scripted_server

    first, second = M.load_questions("mt_bench")[0][:2]
    write_jsonl(tmp_path / "api_bench.jsonl", [first, {**second, "turns": ["word " * 3000, "and then?"]}])
    with scripted_server(lambda m: "Rating: [[8]]") as judge, FaultProxy(server.url.removesuffix("/v1")) as counted:
        r = run_fabrika("eval", "mtbench", "--model", f"openai:tiny@{counted.url}", "--bench",
                        str(tmp_path / "api_bench.jsonl"), "--judge", f"openai:j@{judge}", "--set",
                        "mtbench.max_new_tokens=8", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "question 82 skipped" in r.stdout + r.stderr and "context" in r.stdout + r.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["mtbench"]["api_bench"]
    assert res["n"] == 2 and res["skipped"] == [{"question_id": 82, "turn": 1}, {"question_id": 82, "turn": 2}]
    assert (tmp_path / "ev" / "api_bench" / "model_answer" / "tiny.jsonl").exists()
    assert counted.received == 3  # both first turns (one refused), question 81's second: none asked twice
