"""Relative paths in a pipeline file are read from the file's folder, whatever the working directory;
a missing input stops the run before any stage starts, naming the file and the setting."""

from __future__ import annotations

import shutil

import yaml

from helpers import run_cli


def _pipeline(folder, stages: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipe.yaml"
    path.write_text(yaml.safe_dump({"name": "rel", "stages": stages}, sort_keys=False), encoding="utf-8")
    return str(path)


def test_relative_paths_are_read_from_the_pipeline_folder(tmp_path, small_corpus):
    project = tmp_path / "project"
    shutil.copytree(small_corpus, project / "texts")
    pipe = _pipeline(project / "pipelines", {"tok": {"kind": "tokenizer", "paths": ["../texts"], "vocab_size": 300}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("run", pipe, "--quiet", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "runs" / "rel" / "tok" / "manifest.json").exists()  # run_dir: relative to where fabrika runs


def test_a_missing_input_names_the_file_and_the_setting_before_anything_runs(tmp_path, small_corpus):
    stages = {"tok": {"kind": "tokenizer", "paths": [str(small_corpus)], "vocab_size": 300},
              "prepare": {"tokenizer": "tok", "paths": ["corpus"]}}
    pipe = _pipeline(tmp_path / "p", stages)
    for args in (["--dry-run"], []):
        r = run_cli("run", pipe, *args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "pipe.yaml" in r.stderr and "stages.prepare.paths" in r.stderr and "corpus not found" in r.stderr
    assert not (tmp_path / "runs").exists()  # the tokenizer did not run first

    # the collect source is checked too, not found only after the stages before it
    stages = {"tok": stages["tok"], "collect": {"source": "prompts.jsonl", "teacher": "openai:m@http://127.0.0.1:9/v1"}}
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi there, how are you?"}\n')  # beside the cwd, not the file
    r = run_cli("run", _pipeline(tmp_path / "q", stages), "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "stages.collect.source" in r.stderr, r.stderr
    assert "../prompts.jsonl" in r.stderr  # what to write instead


def test_prompts_and_patterns_are_not_taken_for_paths(tmp_path):
    stages = {"collect": {"source": "org/prompts", "teacher": "openai:m@http://127.0.0.1:9/v1",
                          "system_prompt": "Answer briefly. Never attach a .txt", "refusal_patterns": ["^Sorry.*"],
                          "quota": {"en": 2}}}
    r = run_cli("run", _pipeline(tmp_path / "p", stages), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_dry_run_warns_when_pretraining_repeats_a_finished_corpus(tmp_path, small_corpus, tiny_tokenizer, prepared):
    """The prepare stage already ran: its token count, not an estimate, is what pretraining repeats."""
    stages = {"pretrain": {"data": "prepare", "model": {"arch": "llama", "size": "tiny"}, "seq_len": 64,
                           "train": {"max_steps": 10_000, "batch_size": 64}},
              "prepare": {"tokenizer": str(tiny_tokenizer), "paths": [str(small_corpus)]}}
    pipe = _pipeline(tmp_path / "p", stages)
    shutil.copytree(prepared, tmp_path / "runs" / "rel" / "prepare")
    r = run_cli("run", pipe, "--dry-run", "--only", "pretrain", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "repeats the" in " ".join(r.stdout.split())
