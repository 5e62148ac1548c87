"""A stage's output folder is accepted wherever a model, a tokenizer or a dataset is expected: the folder
given to one command as --out is what the next command takes, as the README chains them."""

from __future__ import annotations

import shutil

from helpers import run_cli, scripted_server


def _sft_folder(tmp_path, chat_model):
    """A finished sft stage's folder: the model under model/, the manifest that names it."""
    from fabrika.artifacts import RunContext

    folder = tmp_path / "s"
    shutil.copytree(chat_model, folder / "model")
    RunContext(stage="sft", kind="sft", stage_dir=folder, fingerprint="x").finish(folder / "model", {})
    return folder


def test_tokenizer_folder_feeds_prepare(tmp_path, tiny_tokenizer, small_corpus):
    tok_folder = tiny_tokenizer.parent  # what `fabrika tokenizer --out tok/` was given
    r = run_cli("prepare", str(small_corpus), "--tokenizer", f"{tok_folder}/", "--out", str(tmp_path / "shards"),
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "shards" / "manifest.json").exists()


def test_sft_folder_chats_as_a_model(tmp_path, chat_model):
    folder = _sft_folder(tmp_path, chat_model)
    for ref in (f"hf:{folder}/", str(folder)):
        r = run_cli("chat", ref, "--query", "hello", "--max-tokens", "3")
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr


def test_folder_with_nothing_loadable_says_what_was_looked_for(tmp_path):
    unfinished = tmp_path / "s"
    unfinished.mkdir()
    (unfinished / ".fingerprint").write_text("abc\n")
    r = run_cli("chat", f"hf:{unfinished}/", "--query", "hello")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "config.json" in r.stderr and "not finished" in r.stderr and str(unfinished) in r.stderr

    empty = tmp_path / "tok"
    empty.mkdir()
    r = run_cli("prepare", str(tmp_path), "--tokenizer", str(empty), "--out", str(tmp_path / "shards"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tokenizer.json" in r.stderr and "manifest.json" in r.stderr


def test_sft_folder_is_evaluated_and_named_after_the_folder(tmp_path, chat_model):
    folder = _sft_folder(tmp_path, chat_model)
    with scripted_server(lambda m: "Fine. Rating: [[6]]") as judge:
        r = run_cli("eval", "mtbench", "--model", f"hf:{folder}/", "--bench", "mt_bench", "--questions", "1",
                    "--judge", f"openai:judge@{judge}", "--out", str(tmp_path / "ev"), "--quiet",
                    "--set", "mtbench.max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ev" / "mt_bench" / "model_answer" / "s.jsonl").exists()
