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


def test_temp_names_cannot_be_planted_in_advance(tmp_path):
    """A link left at the old, predictable temp name must not redirect a write elsewhere."""
    from fabrika.artifacts import replacing

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / ".model.gguf.tmp").symlink_to(victim)
    names = []
    for data in (b"one", b"two"):
        with replacing(tmp_path / "model.gguf") as tmp:
            names.append(tmp.name)
            tmp.write_bytes(data)
    assert (tmp_path / "model.gguf").read_bytes() == b"two" and victim.read_text() == "keep"
    assert names[0] != names[1] and all(n.startswith(".model.gguf.") for n in names)
    assert sorted(os.listdir(tmp_path)) == [".model.gguf.tmp", "model.gguf", "victim.txt"]


def test_a_failed_replacement_keeps_the_old_file(tmp_path):
    import pytest

    from fabrika.artifacts import replacing

    (tmp_path / "out.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert (tmp_path / "out.bin").read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_damaged_outputs_are_named(tmp_path):
    from fabrika.artifacts import damaged_outputs, describe_outputs

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "model" / "b.bin").write_bytes(b"y" * 10)
    (tmp_path / "cache.sqlite").write_bytes(b"z" * 10)
    manifest = {"outputs": describe_outputs(tmp_path), "artifact": {"path": "model"}}
    assert damaged_outputs(tmp_path, manifest) == []
    (tmp_path / "model" / "a.bin").write_bytes(b"x" * 4)
    (tmp_path / "model" / "b.bin").unlink()
    (tmp_path / "cache.sqlite").write_bytes(b"z" * 20)  # a working file beside the artifact: not checked
    assert damaged_outputs(tmp_path, manifest) == ["model/a.bin is 4 bytes, the manifest says 10",
                                                   "model/b.bin is missing"]
