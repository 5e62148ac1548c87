"""Run directories, manifests, fingerprints and crash-safe writes.

A stage writes everything under its own directory and `manifest.json` last, atomically: a stage
directory with a manifest is finished, one without is interrupted. The manifest's fingerprint (the
stage's config, its inputs' fingerprints and the fabrika version) is how the pipeline knows that a
finished stage can be reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fabrika import __version__
from fabrika.errors import FabrikaError

MANIFEST = "manifest.json"  # written last: its presence means the stage finished
FINGERPRINT_FILE = ".fingerprint"  # written when a stage starts: a later run can tell resume from restart
FAILED_FILE = ".failed"  # why the last attempt failed, until the stage runs again


# --- crash-safe writes -------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: str | Path) -> None:
    """Make the names in a directory durable: a rename is only on disk once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temp file to write in place of `path`, renamed over it when the block ends without error.

    The temp name is unpredictable (mkstemp), so nobody can plant a file or link at it beforehand, and
    it lives in the same directory, so the rename is atomic. The data and the rename are fsynced:
    readers, and a machine that loses power, see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: str | Path) -> None:
    """Flush a file another library wrote (safetensors, arrow, gguf) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see old or new, never half."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def cut_torn_tail(path: str | Path) -> int:
    """Cut a JSONL file back to its last newline and return the bytes removed: a write interrupted by
    kill -9 or a full disk leaves a partial last line, and a row appended after it would be glued onto
    it, turning two rows into one line that no reader can parse."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        end = pos = f.seek(0, os.SEEK_END)
        while pos > 0:  # back to just after the last newline, reading 64 KiB at a time
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            nl = f.read(step).rfind(b"\n")
            if nl != -1:
                pos = pos - step + nl + 1
                break
            pos -= step
        if pos < end:
            f.truncate(pos)
            os.fsync(f.fileno())
            print(f"{path}: cut a torn last line ({end - pos} bytes) left by an interrupted write", file=sys.stderr)
        return end - pos


def append_jsonl(path: str | Path, rows: list[dict[str, Any]], fsync: bool = True) -> None:
    """Append rows to a JSONL journal; each row is one line, so a crash can only cut the last one."""
    if not rows:
        return
    cut_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        f.flush()
        if fsync:
            os.fsync(f.fileno())


class Journal:
    """Append-only JSONL for long paid jobs: each row is written to the OS at once, so a killed process
    loses nothing; fsync (milliseconds each) runs at most every `sync_every_s` and on close, so a power
    cut can cost at most that much, and the response cache still holds those answers."""

    def __init__(self, path: str | Path, sync_every_s: float = 1.0) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(path)
        self.file = open(path, "a", encoding="utf-8")
        self.sync_every_s = sync_every_s
        self.synced = time.monotonic()

    def append(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self.file.flush()
        if time.monotonic() - self.synced >= self.sync_every_s:
            os.fsync(self.file.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_REPORTED: set[tuple[str, int]] = set()  # corrupt lines already named, so a reread stays quiet


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL journal. A last line cut short by a crash is ignored; a corrupt line anywhere
    else (a disk error, an edit by hand) is named with its line number and skipped: one bad row
    must not make every answer paid for before and after it unreadable."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # torn final write
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if isinstance(row, dict):
                yield row
            elif (str(path), n) not in _REPORTED:
                _REPORTED.add((str(path), n))
                print(f"{path}:{n}: not a JSON object, skipped", file=sys.stderr)


# --- hashing -----------------------------------------------------------------------------------

def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able data (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def path_fingerprint(path: str | Path) -> Any:
    """Identify raw input files cheaply (path, size, mtime): re-hashing a 20 GB corpus on every run
    would make a cached pipeline slow to say "nothing to do"."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        return [path_fingerprint(c) for c in sorted(p.rglob("*")) if c.is_file() and not c.name.startswith(".")]
    return str(path)


def describe_outputs(stage_dir: Path, hash_limit: int = 64 << 20) -> list[dict[str, Any]]:
    """Files of a finished stage with sizes, and sha256 for those small enough to hash quickly.

    Every file and directory is fsynced on the way: datasets, safetensors and gguf write through
    their own file handles, and the manifest that follows must never reach the disk before the
    outputs it vouches for."""
    out = []
    for p in sorted(stage_dir.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            fsync_dir(p)
        if not p.is_file() or p.name == MANIFEST or p.name.startswith("."):
            continue
        fsync_file(p)
        size = p.stat().st_size
        row: dict[str, Any] = {"path": str(p.relative_to(stage_dir)), "bytes": size}
        if size <= hash_limit:
            row["sha256"] = file_sha256(p)
        out.append(row)
    fsync_dir(stage_dir)
    return out


def damaged_outputs(stage_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """What changed in a finished stage's artifact since its manifest was written: missing files and
    files of another size. Sizes only (a stat each), so checking a reused stage costs nothing; a
    truncated copy or a deleted shard is what this catches. Only the artifact (what the next stage
    reads) is checked: working files beside it, such as a response cache that SQLite rewrites when
    it closes, may change size without anything being wrong."""
    artifact = str((manifest.get("artifact") or {}).get("path", "."))
    problems = []
    for row in manifest.get("outputs") or []:
        if artifact != "." and row["path"] != artifact and not row["path"].startswith(artifact + "/"):
            continue
        p = Path(stage_dir) / row["path"]
        if not p.is_file():
            problems.append(f"{row['path']} is missing")
        elif p.stat().st_size != row["bytes"]:
            problems.append(f"{row['path']} is {p.stat().st_size:,} bytes, the manifest says {row['bytes']:,}")
    return problems


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "tokenizers", "accelerate", "datasets", "peft", "trl", "numpy"]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    found["fabrika"] = __version__
    found["python"] = platform.python_version()
    return found


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    import sys

    torch = sys.modules.get("torch")  # only a stage that used torch has accelerators worth naming
    if torch is not None and torch.cuda.is_available():
        info["accelerator"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# --- artifacts and the context a stage runs in -----------------------------------------------

@dataclass
class Artifact:
    """What a stage hands to the next: its directory, the main output inside it, metrics."""

    stage: str
    kind: str
    dir: Path
    path: Path
    fingerprint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, stage_dir: str | Path) -> "Artifact":
        stage_dir = Path(stage_dir)
        m = read_manifest(stage_dir)
        if m is None:
            raise FabrikaError(f"{stage_dir}: no {MANIFEST}; the stage that writes it has not finished")
        return cls(stage=m["stage"], kind=m["kind"], dir=stage_dir, path=stage_dir / m["artifact"]["path"],
                   fingerprint=m["fingerprint"], metrics=m.get("metrics", {}), extra=m["artifact"].get("extra", {}))


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        return read_json(p)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a manifest that is not whole counts as absent: the stage did not finish


def artifact_in_folder(ref: str) -> str:
    """The artifact a finished stage's folder names in its manifest, kept behind an `hf:`/`gguf:` prefix:
    `tok/` becomes `tok/tokenizer`, `hf:s/` becomes `hf:s/model`, `export/` its GGUF file; anything else
    comes back unchanged.

    Every model, tokenizer and dataset input passes through here (RunContext.resolve and parse_ref), so the
    folder one command was given as --out is what the next command takes, as a user would write it.
    """
    prefix, sep, rest = ref.partition(":")
    prefix, target = (prefix + sep, rest) if sep and prefix in ("hf", "gguf") else ("", ref)
    folder = Path(target).expanduser()
    manifest = read_manifest(folder) if folder.is_dir() else None
    path = str((manifest or {}).get("artifact", {}).get("path", "."))
    if path == ".":
        return ref
    return prefix + str(folder / path)


@dataclass
class RunContext:
    """Where a stage writes, what it reads, and which seed it uses.

    `inputs` maps the names of upstream stages to their artifacts, so a config value that names a
    stage (`data: prepare`) resolves to that stage's output; anything else is a path or a Hub id.
    """

    stage: str
    kind: str
    stage_dir: Path
    seed: int = 0
    inputs: dict[str, Artifact] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    started: float = field(default_factory=time.time)
    quiet: bool = False
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)  # upstream stages' dry-run estimates

    def __post_init__(self) -> None:
        self.stage_dir = Path(self.stage_dir)

    def resolve(self, ref: str) -> str:
        """A stage name or a finished stage's folder becomes its artifact's path; another path or a Hub id
        is returned unchanged."""
        if ref in self.inputs:
            return str(self.inputs[ref].path)
        return artifact_in_folder(ref)

    def input_artifact(self, ref: str) -> Artifact | None:
        if ref in self.inputs:
            return self.inputs[ref]
        p = Path(ref)
        if (p / MANIFEST).exists():
            return Artifact.load(p)
        if p.is_file() and (p.parent / MANIFEST).exists():
            return Artifact.load(p.parent)
        return None

    def resolve_model(self, ref: str) -> str:
        return self.models.get(ref, ref)

    def generator_ref(self, ref: str) -> str:
        """A named model, a stage or a stage directory as a generator reference (hf:, gguf:, openai:)."""
        ref = self.resolve_model(ref)
        art = self.input_artifact(ref)
        if art is not None:
            return f"gguf:{art.path}" if str(art.path).endswith(".gguf") else f"hf:{art.path}"
        return ref

    def finish(self, path: str | Path, config: Any, metrics: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> Artifact:
        """Write the manifest, last: from now on the stage counts as done."""
        rel = Path(path).resolve().relative_to(self.stage_dir.resolve())
        cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
        ended = time.time()
        manifest = {
            "stage": self.stage,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "config": cfg,
            "inputs": {name: {"path": str(a.path), "fingerprint": a.fingerprint} for name, a in self.inputs.items()},
            "artifact": {"path": str(rel), "extra": extra or {}},
            "outputs": describe_outputs(self.stage_dir),
            "metrics": metrics or {},
            "versions": package_versions(),
            "host": host_info(),
            "started": self.started,
            "ended": ended,
            "duration_s": round(ended - self.started, 3),
        }
        atomic_write_json(self.stage_dir / MANIFEST, manifest)
        return Artifact(stage=self.stage, kind=self.kind, dir=self.stage_dir, path=self.stage_dir / rel,
                        fingerprint=self.fingerprint, metrics=metrics or {}, extra=extra or {})
