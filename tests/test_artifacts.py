import json
import os

from fabrika.artifacts import (Artifact, Journal, RunContext, append_jsonl, atomic_write_json, fingerprint,
                               read_jsonl, read_manifest)
from fabrika.config import Config


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert os.listdir(tmp_path) == ["a.json"]


def test_jsonl_ignores_torn_last_line(tmp_path):
    p = tmp_path / "j.jsonl"
    append_jsonl(p, [{"i": 1}, {"i": 2}])
    with open(p, "a") as f:
        f.write('{"i": 3')  # a crash in the middle of a write
    assert [r["i"] for r in read_jsonl(p)] == [1, 2]


def test_appends_after_a_torn_line_and_corrupt_lines_are_skipped(tmp_path, capsys):
    p = tmp_path / "j.jsonl"
    append_jsonl(p, [{"i": 1}, {"i": 2, "big": "ж" * 100_000}])
    with open(p, "ab") as f:
        f.write(json.dumps({"i": 3, "big": "ж" * 100_000}, ensure_ascii=False).encode()[:150_000])  # torn, > 64 KiB
    append_jsonl(p, [{"i": 4}])
    with Journal(p) as j:
        j.append({"i": 5})
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(lines[0] + b"\xff{not json\n" + b"".join(lines[1:]))
    assert [r["i"] for r in read_jsonl(p)] == [1, 2, 4, 5]
    assert f"{p}:2: not a JSON object, skipped" in capsys.readouterr().err


def test_fingerprint_is_order_independent():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


class C(Config):
    x: int = 1


def test_manifest_is_written_last_and_loads_back(tmp_path):
    ctx = RunContext(stage="s", kind="k", stage_dir=tmp_path / "s", fingerprint="abc")
    ctx.stage_dir.mkdir()
    assert read_manifest(ctx.stage_dir) is None
    (ctx.stage_dir / "out.txt").write_text("hello")
    art = ctx.finish(ctx.stage_dir / "out.txt", C(), metrics={"m": 1.5})
    m = read_manifest(ctx.stage_dir)
    assert m["fingerprint"] == "abc" and m["config"] == {"x": 1} and m["metrics"] == {"m": 1.5}
    assert m["outputs"][0]["path"] == "out.txt" and len(m["outputs"][0]["sha256"]) == 64
    assert "torch" in m["versions"] and m["host"]["hostname"]
    loaded = Artifact.load(ctx.stage_dir)
    assert loaded.path == art.path and loaded.metrics == {"m": 1.5}


def test_torn_manifest_counts_as_unfinished(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stage": ')
    assert read_manifest(tmp_path) is None


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from fabrika.artifacts import atomic_write_text

    atomic_write_text(tmp_path / "shared.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
