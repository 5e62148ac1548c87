"""A stage command (`fabrika tokenizer ... --out D`) treats D as a pipeline treats a stage's folder: the
same command again reuses D, an unfinished D is resumed, and changed input data or settings start D
afresh instead of resuming work made from other inputs; a finished D whose files changed since is
never rebuilt behind the user's back."""

from __future__ import annotations

import json

from helpers import run_cli


def _fingerprint(out) -> str:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))["fingerprint"]


def test_a_stage_command_reuses_resumes_and_restarts_its_folder(tmp_path, small_corpus):
    text = (small_corpus / "en.txt").read_text(encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[:40_000], encoding="utf-8")
    out = tmp_path / "tok"
    args = ["tokenizer", str(corpus), "--vocab-size", "300", "--out", str(out)]

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer (tokenizer) — running" in r.stdout and "✓ tokenizer: done" in r.stdout
    first = _fingerprint(out)

    r = run_cli(*args)  # the same command, the same file: nothing runs
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"✓ tokenizer: cached (fingerprint {first})" in r.stdout and "— running" not in r.stdout

    (out / "manifest.json").unlink()  # what a kill before the end leaves: the folder without its manifest
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer (tokenizer) — resuming" in r.stdout and _fingerprint(out) == first

    stray = out / "left-by-the-old-data.txt"
    stray.write_text("x", encoding="utf-8")
    corpus.write_text(text[40_000:], encoding="utf-8")  # the same path, other content
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer (tokenizer) — running" in r.stdout and not stray.exists()
    second = _fingerprint(out)
    assert second != first

    stray.write_text("x", encoding="utf-8")
    r = run_cli(*args[:2], "--vocab-size", "320", "--out", str(out))  # other settings
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokenizer (tokenizer) — running" in r.stdout and not stray.exists()
    assert _fingerprint(out) not in (first, second)

    (out / "tokenizer" / "tokenizer.json").write_text("{}", encoding="utf-8")  # a finished result damaged since
    r = run_cli(*args[:2], "--vocab-size", "320", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tokenizer.json" in r.stderr and f"Delete {out}" in r.stderr
