"""The GPU reference job: the heavy parts of the Llama-3-8B QLoRA recipe (examples/) on one CUDA GPU,
with nothing downloaded, measured, and projected to the whole job.

    python bench/gpu_reference.py            # one H100/H200, under 9 minutes
    python bench/gpu_reference.py --tiny     # the same code path on CPU in under 2 minutes (a test)

A Llama-3-8B-shaped model with random weights (its tokenizer trained here on the shipped corpus and
padded to Llama-3's 128,256 ids) goes through: QLoRA SFT on 3,000 synthetic conversations with
Tagengo-like lengths, long enough to be steady, with gradient checkpointing on and (briefly) off; the
3-epoch time projected from the steady tokens/s; MT-Bench answers (80 questions, both turns: 160
turns) on vLLM where it is installed (`make vllm`), else transformers, saying which; GGUF F16 and
Q4_K_M export. Every step runs in a fresh process, so its peak host (VmHWM) and GPU memory are its
own. The table is printed and appended to bench/RESULTS.md (--results elsewhere).

MFU is against the GPU's dense bf16 peak, trainable-aware as the trainer logs it (frozen base weights
get no weight gradients, so LoRA/QLoRA does ~4N FLOPs per token), and beside it the 6N figure that
overstates adapter training by about 1.5×.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTICLE_MINUTES = 30  # the reference article's Llama-3-8B QLoRA SFT on one GPU
REFERENCE_ROWS, REFERENCE_EPOCHS = 3000, 3

SHAPES = {  # Llama-3-8B, and a CPU-sized model of the same family
    "full": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=4096, max_position_embeddings=2048, rope_theta=500000.0),
}

CHILD = r"""
import json, os, statistics, sys, time
def peak_rss():  # VmHWM: this process's own high-water mark
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
a = json.loads(sys.argv[1])
import torch
cuda = torch.cuda.is_available()
out = {}
t = time.perf_counter()
if a["what"] == "sft":
    from fabrika.artifacts import RunContext, read_jsonl
    from fabrika.train import sft
    cfg = sft.CONFIG(model=a["model"], data=a["data"], method=a["method"], max_length=a["seq"], eval_fraction=0,
                     merge=False, template="llama3",
                     train={"max_steps": a["steps"], "batch_size": a["batch"], "grad_accum": a["accum"],
                            "logging_steps": 1, "eval_steps": None, "save_steps": 100000, "lr": 2e-4,
                            "gradient_checkpointing": a["checkpointing"], **({} if cuda else {"peak_tflops": 0.14})})
    art = sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=a["out"], quiet=True))
    rows = [r for r in read_jsonl(a["out"] + "/metrics.jsonl") if "tokens_per_s" in r]
    steady = rows[len(rows) // 3:] or rows
    m = json.loads(open(a["out"] + "/manifest.json").read())["metrics"]
    out.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
               mfu=statistics.median(r["mfu"] for r in steady) if all("mfu" in r for r in steady) else None,
               batching=m.get("batching"), loss_head=m.get("loss_head"), steps=m.get("steps"))
    from fabrika.train import setup
    out["attention"] = setup.attention(cfg.train, setup.check_device(cfg.train), fine_tuning=True)
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(a["model"])  # the log's MFU counts 4N for adapters; 6N for comparison
    out["six_n_over_logged"] = setup.flops_per_token(config, a["seq"]) / setup.flops_per_token(
        config, a["seq"], frozen_weights=a["method"] != "full")
elif a["what"] == "answers":
    from fabrika.evaluate import mtbench as M
    from fabrika.infer.backends import load_generator
    questions = M.load_questions("mt_bench")[0][: a["questions"]]
    gen = load_generator("hf:" + a["model"])
    out["engine"] = "vLLM" if type(gen).__name__ == "VLLMGenerator" else "transformers"
    class Counting:  # the new tokens the engine reports
        tokens = 0
        def generate(self, convs, params):
            r = gen.generate(convs, params)
            Counting.tokens += sum(c.completion_tokens for choices in r for c in choices)
            return r
    t = time.perf_counter()
    answers = M.generate_answers(Counting(), questions, __import__("pathlib").Path(a["out"]), "reference", a["tokens"],
                                 batch=80)
    out.update(turns=sum(len(x["choices"][0]["turns"]) for x in answers), new_tokens=Counting.tokens)
    if hasattr(gen, "close"):
        gen.close()
elif a["what"] == "convert":
    from fabrika.export import gguf as writer
    writer.convert(a["model"], a["out"], "f16")
elif a["what"] == "quantize":
    from pathlib import Path
    from fabrika.export.stage import quantize
    quantize(Path(a["src"]), Path(a["out"]), "q4_k_m")
out.update(seconds=time.perf_counter() - t, peak_rss=peak_rss(),
           peak_gpu=torch.cuda.max_memory_allocated() if cuda else None)
print("RESULT " + json.dumps(out))
"""


def child(**args) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"step {args['what']} failed:\n{r.stderr[-4000:]}")
    for line in r.stderr.splitlines():
        if line.startswith("engine for "):
            print(line)
    return json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the same path on CPU with a tiny model (a test)")
    ap.add_argument("--steps", type=int, help="optimizer steps measured with checkpointing on (default 40; tiny 3)")
    ap.add_argument("--gen-tokens", type=int, help="longest answer per MT-Bench turn (default 512; tiny 8)")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"), help="Markdown file to append to")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not args.tiny and not cuda:
        raise SystemExit("the reference job needs a CUDA GPU; --tiny runs the same steps on CPU")
    tiny = args.tiny
    shape = SHAPES["tiny" if tiny else "full"]
    steps = args.steps or (3 if tiny else 40)
    gen_tokens = args.gen_tokens or (8 if tiny else 512)
    method = "qlora" if cuda else "lora"
    seq, batch, accum = (2048, 2, 1) if tiny else (2048, 2, 4)
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    times: dict[str, float] = {}
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        tok_dir = make_tokenizer(work, 1024 if tiny else 8192, shape["vocab_size"])
        model = make_model(work, shape, tok_dir)
        data = work / "chat.jsonl"
        make_conversations(data, 200 if tiny else REFERENCE_ROWS)
        per_conv = conversation_tokens(data, tok_dir)
        times["build model and data"] = time.perf_counter() - t
        print(f"model {shape['num_hidden_layers']} layers × {shape['hidden_size']}, vocab {shape['vocab_size']}; "
              f"{per_conv:.0f} tokens per conversation on average; {device}", flush=True)

        sft_on = child(what="sft", model=str(model), data=str(data), method=method, seq=seq, batch=batch,
                       accum=accum, steps=steps, checkpointing=True, out=str(work / "sft-ckpt"))
        times["QLoRA SFT, checkpointing on" if cuda else "LoRA SFT, checkpointing on"] = sft_on["seconds"]
        sft_off = child(what="sft", model=str(model), data=str(data), method=method, seq=seq, batch=batch,
                        accum=accum, steps=max(2, steps // 8), checkpointing=False, out=str(work / "sft-plain"))
        times["SFT, checkpointing off (memory)"] = sft_off["seconds"]
        tps = sft_on["tokens_per_s"]
        job_tokens = REFERENCE_ROWS * REFERENCE_EPOCHS * per_conv
        projected_min = job_tokens / tps / 60

        answers = child(what="answers", model=str(model), questions=2 if tiny else 80, tokens=gen_tokens,
                        out=str(work / "answers.jsonl"))
        times[f"MT-Bench answers ({answers['engine']}, {answers['turns']} turns)"] = answers["seconds"]

        f16 = work / "model-f16.gguf"
        conv = child(what="convert", model=str(model), out=str(f16))
        times["GGUF F16"] = conv["seconds"]
        quant = child(what="quantize", src=str(f16), out=str(work / "model-q4_k_m.gguf"))
        times["GGUF Q4_K_M"] = quant["seconds"]

    mfu = sft_on.get("mfu")
    rows += [("SFT tokens/s (steady)", f"{tps:,.0f}"),
             ("MFU counting 6N per token", "—" if mfu is None else f"{mfu * sft_on['six_n_over_logged']:.1%}"),
             ("MFU, trainable-aware (4N for adapters)", "—" if mfu is None else f"{mfu:.1%}"),
             ("attention / batching / loss head", f"{sft_on['attention']} / {sft_on['batching']} / "
                                                   f"{sft_on['loss_head']}"),
             ("peak GPU memory, checkpointing on / off", f"{gib(sft_on['peak_gpu'])} / {gib(sft_off['peak_gpu'])}"),
             ("peak host memory, checkpointing on / off", f"{gib(sft_on['peak_rss'])} / {gib(sft_off['peak_rss'])}"),
             ("generation tokens/s", f"{answers['new_tokens'] / answers['seconds']:,.0f}"),
             ("export peak host memory F16 / Q4_K_M", f"{gib(conv['peak_rss'])} / {gib(quant['peak_rss'])}")]
    rows += [(f"time: {k}", f"{v:.0f} s") for k, v in times.items()]
    rows += [("projected 3,000 × 3-epoch SFT", f"{projected_min:.1f} min (article: ~{ARTICLE_MINUTES} min)"),
             ("this run, in all", f"{sum(times.values()) / 60:.1f} min")]

    from rich.console import Console
    from rich.table import Table

    title = f"GPU reference job ({'tiny, ' if tiny else ''}{device}, {time.strftime('%Y-%m-%d')})"
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=110).print(table)
    md = [f"\n## {title} — `python bench/gpu_reference.py{' --tiny' if tiny else ''}`", "| measure | value |",
          "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
