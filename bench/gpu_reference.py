"""The GPU reference job: the heavy parts of the Llama-3-8B QLoRA recipe (examples/) on one CUDA GPU,
with nothing downloaded, measured, and projected to the whole job.

    python bench/gpu_reference.py            # one H100/H200, under 9 minutes
    python bench/gpu_reference.py --tiny     # the same code path on CPU in under 2 minutes (a test)

A Llama-3-8B-shaped model with random weights (its tokenizer trained here on the shipped corpus and
padded to Llama-3's 128,256 ids) goes through: QLoRA SFT on 3,000 synthetic conversations with
Tagengo-like lengths, long enough to be steady (the baseline: fabrika's default switches for the
machine, gradient checkpointing on); the 3-epoch time projected from the steady tokens/s, next to the
article's ~30 minutes and the issue's goal of 10; the performance switches, each flipped alone from
the baseline's settings for a few steps (attention sdpa / flash_attention_2, batching packed / padded,
torch.compile, Liger kernels, checkpointing off), with steady tokens/s and peak GPU memory; the adapter's
save and its merge into the base model (the SFT stage's own merge), timed with their peaks; MT-Bench
answers (80 questions, both turns: 160 turns) on vLLM where it is installed (`make vllm`), else
transformers, saying which; milliseconds per decode step of the transformers generator with the
adapter unmerged and merged; GGUF F16 and Q4_K_M export. Every step runs in a fresh process, so its
peak host (VmHWM) and GPU memory are its own; a switch that cannot run here is skipped with the
reason, and one that fails or outlasts its limit is reported with its last line, not lost. The
tables are printed and appended to bench/RESULTS.md (--results elsewhere).

Time budget on one H100/H200 SXM (16 cores, NVMe, the 16 GB of weights staying in the page cache),
about 7.6 minutes in all, under 9:
  the job's own start-up                                   ~15 s
  build tokenizer, model and data                          ~40 s
  baseline SFT: 16 optimizer steps, ~30 s loading 4-bit    ~70 s
  switches: 8 steps each, one process each                ≤200 s  (≤90 s each; what does not fit is skipped)
  MT-Bench answers: vLLM start-up and 160 turns          ~100 s  } alongside: GGUF F16 (~40 s), Q4_K_M
  decode ms/step, adapter and merged                      ~30 s  } (~50 s), the merge (~35 s), on half the cores
Export, merge and generation share the CPU in that last part, so their times are a little longer
than each would be alone; training is measured with the machine to itself.

MFU is against the GPU's dense bf16 peak, trainable-aware as the trainer logs it (frozen base weights
get no weight gradients, so LoRA/QLoRA does ~4N FLOPs per token), and beside it the 6N figure that
overstates adapter training by about 1.5×.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = Path(__file__).with_name("gpu_reference_steps.py")
ARTICLE_MINUTES = 30  # the reference article's Llama-3-8B QLoRA SFT on one GPU
GOAL_MINUTES = 10  # the issue's goal for the same job
SWITCH_LIMIT = 90  # seconds for one switch's process: loading, compiling and its steps
REFERENCE_ROWS, REFERENCE_EPOCHS = 3000, 3

SHAPES = {  # Llama-3-8B, and a CPU-sized model of the same family
    "full": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=4096, max_position_embeddings=2048, rope_theta=500000.0),
}


class StepFailed(Exception):
    """A step's process failed or outlasted its limit; the message is its last line, `log` its stderr's end."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


def child(limit: float | None = None, **args) -> dict:
    """Run one step of bench/gpu_reference_steps.py in a fresh process (its own session, so that a step
    stopped at its limit takes its compiler workers with it) and return what it measured."""
    proc = subprocess.Popen([sys.executable, str(STEPS), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise StepFailed(f"stopped at its {limit:.0f} s limit") from None
    for line in err.splitlines():
        if line.startswith("engine for "):
            print(line, flush=True)
    if proc.returncode:
        raise StepFailed(error_of(err) or f"exit status {proc.returncode}", err[-4000:])
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def error_of(stderr: str) -> str:
    """What a failed step ended with, on one line: the exception after its last traceback's frames (all
    its lines: a validation error names the setting on its second), else the last line it wrote."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return lines[-1].strip() if lines else ""
    after = lines[starts[-1] + 1:]
    message = next((i for i, line in enumerate(after) if not line.startswith(" ")), len(after))
    return " ".join(line.strip() for line in after[message:])[:300]


def make_tokenizer(work: Path, bpe_vocab: int, vocab: int) -> Path:
    """A byte-level BPE trained on the shipped corpus with Llama-3's chat tokens, its vocabulary padded
    with never-produced entries to `vocab` ids: the embedding and LM-head shapes of Llama-3."""
    from fabrika.artifacts import RunContext
    from fabrika.models import tokenizer

    path = tokenizer.run(tokenizer.CONFIG(paths=[str(REPO / "data" / "corpus")], vocab_size=bpe_vocab,
                                          chat_template="llama3"),
                         RunContext(stage="tokenizer", kind="tokenizer", stage_dir=work / "tokenizer", quiet=True)).path
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    ids = spec["model"]["vocab"]
    top = max(max(ids.values()), *(t["id"] for t in spec["added_tokens"])) + 1
    ids.update({f"<|reserved_{i}|>": i for i in range(top, vocab)})
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


def make_model(work: Path, shape: dict, tokenizer_dir: Path) -> Path:
    """Random weights in bf16, built on the GPU when there is one (seconds, where CPU init takes minutes)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def make_conversations(path: Path, n: int, seed: int = 0) -> None:
    """Tagengo-like chat data: short prompts and long answers (log-normal, ~200 and ~600 tokens) in the
    corpus's three languages."""
    rng = random.Random(seed)
    corpus = REPO / "data" / "corpus"
    words = {"en": (corpus / "en" / "tinyshakespeare.txt").read_text(encoding="utf-8").split(),
             "ru": " ".join(p.read_text(encoding="utf-8") for p in sorted((corpus / "ru").glob("*.txt"))[:3]).split(),
             "zh": list("".join(json.loads(line).get("text", "") for line in
                                (corpus / "zh" / "lunyu.jsonl").read_text(encoding="utf-8").splitlines()[:400]))}
    rows = []
    for _ in range(n):
        lang = rng.choice(list(words))
        w = words[lang]
        sep = "" if lang == "zh" else " "
        q = sep.join(rng.choice(w) for _ in range(max(4, int(rng.lognormvariate(4.3, 0.6)))))
        ans = sep.join(rng.choice(w) for _ in range(max(8, min(1500, int(rng.lognormvariate(5.9, 0.6))))))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def conversation_tokens(data: Path, tokenizer_dir: Path, sample: int = 300) -> float:
    """Mean tokens per conversation under the llama3 template, from a sample."""
    from transformers import AutoTokenizer

    from fabrika.models.templates import TEMPLATES

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = TEMPLATES["llama3"].jinja
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:sample]]
    return statistics.mean(len(tok.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows)


def gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:.1f} GiB"


def switches_to_try(base: dict, cuda: bool, tiny: bool) -> list[tuple[str, dict | str]]:
    """Each switch flipped alone from the baseline's settings as resolved (auto written out, so that
    flash attention does not also bring packing with it); a string says why the switch cannot run here."""
    from fabrika.train.setup import flash_attention_loads

    flash = base["attention"] == "flash_attention_2"
    if flash:
        attention: dict | str = {"attn_implementation": "sdpa"}
    elif not cuda:
        attention = "needs a CUDA GPU"
    else:
        attention = {"attn_implementation": "flash_attention_2"} if flash_attention_loads() else "not installed"
    liger = ("needs a CUDA GPU" if not cuda else {"liger_kernel": True} if importlib.util.find_spec("liger_kernel")
             else "not installed")
    return [("checkpointing off", {"gradient_checkpointing": False}),
            (f"attention {'sdpa' if flash else 'flash_attention_2'}", attention),
            *[(f"batching {b}", {"batching": b}) for b in ("packed", "grouped", "padded") if b != base["batching"]],
            ("Liger kernels on", liger),
            ("torch.compile on", "not on --tiny: inductor's CPU build alone outlasts the test" if tiny
             else {"compile": True})]


def measure_switches(base: dict, tries: list[tuple[str, dict | str]], seconds: float, limit: float, out: Path,
                     **sft_args) -> list[tuple[str, dict | str]]:
    """The switches one after another, each in its own process, within `seconds` in all and `limit`
    each; a failure is kept as its error and the others still run."""
    settings = {"batching": base["batching"], "attn_implementation": base["attention"],
                "gradient_checkpointing": True, "compile": False, "liger_kernel": False}
    done: list[tuple[str, dict | str]] = []
    end = time.perf_counter() + seconds
    for i, (name, change) in enumerate(tries):
        left = end - time.perf_counter()
        if isinstance(change, dict) and left < limit / 3:
            change = f"skipped: the switches' {seconds:.0f} s were spent"
        if isinstance(change, dict):
            try:
                change = child(what="sft", switches={**settings, **change}, limit=min(limit, left),
                               out=str(out / f"switch-{i}"), **sft_args)
            except StepFailed as e:
                change = f"failed: {e}"
        done.append((name, change))
        print(f"switch {name}: " + (change if isinstance(change, str) else f"{change['tokens_per_s']:,.0f} tokens/s"),
              flush=True)
    return done


def export_and_merge(work: Path, model: Path, adapter: str, eot: str, cpus: list[int]) -> dict[str, dict]:
    """What needs no GPU, on `cpus` only, alongside the GPU's generation: GGUF F16 and Q4_K_M, and the
    adapter merged into the base model. Each big file goes once measured: the disk then holds at most
    three 16 GB copies of the model."""
    f16 = work / "model-f16.gguf"
    done = {"convert": child(what="convert", model=str(model), out=str(f16), cpus=cpus)}
    done["quantize"] = child(what="quantize", src=str(f16), out=str(work / "model-q4_k_m.gguf"), cpus=cpus)
    f16.unlink()
    done["merge"] = child(what="merge", model=str(model), adapter=adapter, eot=eot, out=str(work / "merged"),
                          cpus=cpus)
    shutil.rmtree(work / "merged")
    return done


def switch_rows(base: dict, measured: list[tuple[str, dict | str]]) -> list[tuple[str, ...]]:
    """switch | tokens/s | Δ vs baseline | peak GPU GiB."""
    gpu = (lambda r: "—" if r["peak_gpu"] is None else f"{r['peak_gpu'] / 2**30:.1f}")
    rows = [(f"baseline ({base['attention']}, {base['batching']}, checkpointing on)", f"{base['tokens_per_s']:,.0f}",
             "—", gpu(base))]
    for name, r in measured:
        if isinstance(r, str):
            rows.append((name, r, "—", "—"))
        else:
            rows.append((name, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s'] - 1:+.0%}",
                         gpu(r)))
    return rows


def projection_rows(tps: float, job_tokens: float, measured: list[tuple[str, dict | str]]) -> list[tuple[str, str]]:
    """The 3,000 × 3-epoch SFT projected from the baseline (and from the fastest switch, if one is
    faster), beside the article's ~30 minutes and the issue's 10."""
    minutes = job_tokens / tps / 60
    rows = [("projected 3,000 × 3-epoch SFT", f"{minutes:.1f} min (article: ~{ARTICLE_MINUTES} min)")]
    faster = [(r["tokens_per_s"], name) for name, r in measured if isinstance(r, dict) and r["tokens_per_s"] > tps]
    if faster:
        best, name = max(faster)
        rows.append((f"projected with {name}", f"{job_tokens / best / 60:.1f} min"))
        tps = best
    need = job_tokens / (GOAL_MINUTES * 60)
    rows.append((f"≤ {GOAL_MINUTES}-minute goal", "met" if tps >= need else
                 f"not met: needs {need:,.0f} tokens/s, {need / tps:.1f}× the fastest measured"))
    return rows


def table(title: str, columns: list[str], rows: list[tuple[str, ...]]) -> list[str]:
    """Printed with rich; returned as Markdown for the results file."""
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=title)
    for i, c in enumerate(columns):
        shown.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        shown.add_row(*r)
    Console(width=140).print(shown)
    cell = (lambda v: v.replace("|", "\\|"))
    return [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)] + [
        f"| {' | '.join(cell(v) for v in r)} |" for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the same path on CPU with a tiny model (a test)")
    ap.add_argument("--steps", type=int, help="optimizer steps of the baseline SFT (default 16; tiny 3)")
    ap.add_argument("--switch-steps", type=int, help="optimizer steps per switch (default 8; tiny 2)")
    ap.add_argument("--switch-seconds", type=float, default=200, help="time for all the switches together")
    ap.add_argument("--gen-tokens", type=int, help="longest answer per MT-Bench turn (default 512; tiny 8)")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"), help="Markdown file to append to")
    args = ap.parse_args()
    try:
        run(args)
    except StepFailed as e:
        raise SystemExit(f"a step failed: {e}\n{e.log}") from None


def run(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if not args.tiny and not cuda:
        raise SystemExit("the reference job needs a CUDA GPU; --tiny runs the same steps on CPU")
    tiny = args.tiny
    shape = SHAPES["tiny" if tiny else "full"]
    steps = args.steps or (3 if tiny else 16)
    switch_steps = args.switch_steps or (2 if tiny else 8)
    gen_tokens = args.gen_tokens or (8 if tiny else 512)
    method = "qlora" if cuda else "lora"
    seq, batch, accum = (2048, 2, 1) if tiny else (2048, 2, 4)
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    cores = sorted(os.sched_getaffinity(0))
    background = cores[len(cores) // 2:]
    start = time.perf_counter()
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        tok_dir = make_tokenizer(work, 3072 if tiny else 8192, shape["vocab_size"])
        model = make_model(work, shape, tok_dir)
        data = work / "chat.jsonl"
        make_conversations(data, 120 if tiny else REFERENCE_ROWS)
        per_conv = conversation_tokens(data, tok_dir)
        times["build model and data"] = time.perf_counter() - t
        print(f"model {shape['num_hidden_layers']} layers × {shape['hidden_size']}, vocab {shape['vocab_size']}; "
              f"{per_conv:.0f} tokens per conversation on average; {device}", flush=True)

        sft_args = dict(model=str(model), data=str(data), method=method, seq=seq, batch=batch, accum=accum)
        base = child(what="sft", switches={"batching": "auto", "gradient_checkpointing": True}, steps=steps,
                     out=str(work / "sft"), **sft_args)
        times["QLoRA SFT, baseline" if cuda else "LoRA SFT, baseline"] = base["seconds"]
        t = time.perf_counter()
        measured = measure_switches(base, switches_to_try(base, cuda, tiny), args.switch_seconds,
                                    SWITCH_LIMIT, work, steps=switch_steps, **sft_args)
        times[f"switches, {switch_steps} steps each"] = time.perf_counter() - t
        plain = dict(measured)["checkpointing off"]

        with ThreadPoolExecutor(1) as pool:
            cpu_work = pool.submit(export_and_merge, work, model, base["adapter"], base["eot"], background)
            answers = child(what="answers", model=str(model), questions=2 if tiny else 80, tokens=gen_tokens,
                            out=str(work / "answers.jsonl"))
            times[f"MT-Bench answers ({answers['engine']}, {answers['turns']} turns)"] = answers["seconds"]
            decode = child(what="decode", model=str(model), adapter=base["adapter"], prompts=2 if tiny else 8,
                           tokens=8 if tiny else 64)
            times["decode, adapter and merged"] = decode["seconds"]
            done = cpu_work.result()
        alongside = f"alongside, on {len(background)} of {len(cores)} cores"
        times[f"GGUF F16 ({alongside})"] = done["convert"]["seconds"]
        times["GGUF Q4_K_M"] = done["quantize"]["seconds"]
        times["merge adapter into base"] = done["merge"]["seconds"]

    tps = base["tokens_per_s"]
    job_tokens = REFERENCE_ROWS * REFERENCE_EPOCHS * per_conv
    mfu = base.get("mfu")
    save, merge = base["save"], done["merge"]
    rows = [("SFT tokens/s (steady)", f"{tps:,.0f}"),
            ("MFU counting 6N per token", "—" if mfu is None else f"{mfu * base['six_n_over_logged']:.1%}"),
            ("MFU, trainable-aware (4N for adapters)", "—" if mfu is None else f"{mfu:.1%}"),
            ("attention / batching / loss head", f"{base['attention']} / {base['batching']} / {base['loss_head']}"),
            ("peak GPU memory, checkpointing on / off",
             f"{gib(base['peak_gpu'])} / {gib(plain['peak_gpu']) if isinstance(plain, dict) else plain}"),
            ("peak host memory, checkpointing on / off",
             f"{gib(base['peak_rss'])} / {gib(plain['peak_rss']) if isinstance(plain, dict) else plain}"),
            ("adapter save: time / peak host / peak GPU",
             f"{save['seconds']:.1f} s / {gib(save['peak_rss'])} / {gib(save['peak_gpu'])}"),
            ("merge into the base: time / peak host / peak GPU",
             f"{merge['seconds']:.1f} s / {gib(merge['peak_rss'])} / {gib(merge['peak_gpu'])}"),
            ("generation tokens/s", f"{answers['new_tokens'] / answers['seconds']:,.0f}"),
            (f"decode ms/step, adapter / merged ({decode['prompts']} prompts)",
             f"{decode['adapter_ms']:.1f} / {decode['merged_ms']:.1f} ms "
             f"({decode['adapter_ms'] / decode['merged_ms']:.2f}×)"),
            ("export peak host memory F16 / Q4_K_M",
             f"{gib(done['convert']['peak_rss'])} / {gib(done['quantize']['peak_rss'])}")]
    rows += [(f"time: {k}", f"{v:.0f} s") for k, v in times.items()]
    summary = projection_rows(tps, job_tokens, measured)
    rows += summary + [("this run, in all", f"{(time.perf_counter() - start) / 60:.1f} min")]

    title = f"GPU reference job ({'tiny, ' if tiny else ''}{device}, {time.strftime('%Y-%m-%d')})"
    md = [f"\n## {title} — `python bench/gpu_reference.py{' --tiny' if tiny else ''}`"]
    md += table(title, ["measure", "value"], rows)
    switches_title = (f"Performance switches: each alone against the baseline, {switch_steps} optimizer steps in a "
                      f"fresh process, steady tokens/s after the first third")
    md += ["", switches_title]
    md += table(switches_title, ["switch", "tokens/s", "Δ vs baseline", "peak GPU GiB"], switch_rows(base, measured))
    print("; ".join(f"{k}: {v}" for k, v in summary), flush=True)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
