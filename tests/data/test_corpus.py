"""Text sources and `prepare`: every input kind, bad input, shard layout, dedup, and kill-and-resume."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run_cli, write_jsonl
from transformers import AutoTokenizer

from fabrika.artifacts import RunContext
from fabrika.data import corpus
from fabrika.data.text_sources import ReadStats, TextSources, iter_documents
from fabrika.errors import FabrikaError


def docs(**kw) -> list[str]:
    return list(iter_documents(TextSources(**kw)))


def test_text_sources_every_kind(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n\n\nfour\n")
    assert docs(paths=[str(tmp_path / "a.txt")]) == ["one\ntwo", "three", "four"]
    assert docs(paths=[str(tmp_path / "a.txt")], sample_by="line") == ["one", "two", "three", "four"]
    assert len(docs(paths=[str(tmp_path / "a.txt")], sample_by="document")) == 1
    write_jsonl(tmp_path / "b.jsonl", [{"text": "j1"}, {"text": "j2", "x": 1}])
    pq.write_table(pa.table({"body": ["p1", "p2", "p3"]}), tmp_path / "c.parquet")
    assert docs(paths=[str(tmp_path / "b.jsonl")]) == ["j1", "j2"]
    assert docs(paths=[str(tmp_path / "c.parquet")], text_field="body") == ["p1", "p2", "p3"]
    assert len(docs(paths=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")])) == 5
    sub = tmp_path / "folder"
    sub.mkdir()
    (sub / "x.txt").write_text("x")
    assert docs(paths=[str(sub)]) == ["x"]
    assert docs(paths=[str(tmp_path / "a.txt")], max_documents=2) == ["one\ntwo", "three"]
    # a Hub-style dataset through `datasets` (here a saved local copy)
    import datasets

    datasets.Dataset.from_dict({"text": ["d1", "d2"]}).save_to_disk(str(tmp_path / "ds"))
    assert docs(dataset=str(tmp_path / "ds")) == ["d1", "d2"]


def test_undecodable_bytes_are_counted_and_skipped(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good \xff\xfe text\n\nmore\n")
    stats = ReadStats()
    out = list(iter_documents(TextSources(paths=[str(tmp_path / "bad.txt")]), stats))
    assert out == ["good  text", "more"] and stats.undecodable_bytes == 2


def test_bad_sources(tmp_path):
    with pytest.raises(FabrikaError, match="does not exist"):
        docs(paths=[str(tmp_path / "missing.txt")])
    with pytest.raises(FabrikaError, match="matches no file"):
        docs(paths=[str(tmp_path / "*.nothing")])
    write_jsonl(tmp_path / "b.jsonl", [{"content": "x", "id": 1}])
    with pytest.raises(FabrikaError, match=r"b.jsonl:1: no 'text' field \(it has: content, id\)"):
        docs(paths=[str(tmp_path / "b.jsonl")])
    with pytest.raises(FabrikaError, match="give files"):
        docs()


def test_prepare_layout_dedup_val_and_eos(tmp_path, tiny_tokenizer, small_corpus):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    (tmp_path / "dup.txt").write_text("same paragraph\n\nsame paragraph\n\nother one\n\nsame paragraph\n")
    cfg = corpus.CONFIG(tokenizer=str(tiny_tokenizer), paths=[str(small_corpus), str(tmp_path / "dup.txt")],
                        shard_mb=0.02, val_fraction=0.1, batch_docs=50)
    art = corpus.run(cfg, RunContext(stage="p", kind="prepare", stage_dir=tmp_path / "out", quiet=True))
    index = corpus.read_index(art.path)
    assert index["complete"] and index["dtype"] == "uint16" and len(index["train"]) > 2 and index["val"]
    assert index["stats"]["duplicates_dropped"] == 2
    train = corpus.open_split(art.path, "train")
    assert sum(len(s) for s in train) == index["stats"]["train_tokens"]
    first = np.asarray(train[0])
    eos_positions = np.flatnonzero(first == tok.eos_token_id)
    assert len(eos_positions) > 1 and first[-1] == tok.eos_token_id  # documents end with eos
    sources = "".join(p.read_text() for p in small_corpus.iterdir())
    doc = tok.decode(first[eos_positions[0] + 1: eos_positions[1]])
    assert doc.strip() and (doc in sources or json.dumps(doc, ensure_ascii=False)[1:-1] in sources)
    assert (art.path / "tokenizer" / "tokenizer.json").exists()


def test_prepare_kill_and_resume_is_byte_identical(tmp_path, tiny_tokenizer, small_corpus):
    cfg = {"tokenizer": str(tiny_tokenizer), "paths": [str(small_corpus)], "shard_mb": 0.02, "batch_docs": 20}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    whole = run_cli("prepare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "whole"), "--quiet")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_cli("prepare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "resumed"), "--quiet",
                     env={"FABRIKA_FAULT": "exit_after_shards=3"})
    assert killed.returncode == -9
    partial = corpus.read_index(tmp_path / "resumed")
    assert not partial["complete"] and partial["docs_consumed"] > 0
    again = run_cli("prepare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "resumed"), "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = corpus.read_index(tmp_path / "whole"), corpus.read_index(tmp_path / "resumed")
    assert [s for s in a["train"]] == [s for s in b["train"]] and a["val"] == b["val"]
    for s in a["train"] + a["val"]:
        assert (tmp_path / "whole" / s["file"]).read_bytes() == (tmp_path / "resumed" / s["file"]).read_bytes()
    assert a["stats"]["duplicates_dropped"] == b["stats"]["duplicates_dropped"]


def test_empty_corpus_is_an_error(tmp_path, tiny_tokenizer):
    (tmp_path / "e.txt").write_text("\n\n\n")
    r = run_cli("prepare", str(tmp_path / "e.txt"), "--tokenizer", str(tiny_tokenizer), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no training text" in r.stderr
