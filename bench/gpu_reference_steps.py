"""One step of the GPU reference job (bench/gpu_reference.py), run in a process of its own so that its
peak host memory (VmHWM) and GPU memory are its own:

    python bench/gpu_reference_steps.py '{"what": "sft", ...}'

prints `RESULT {...}` (JSON) as its last line: the step's seconds, peaks and measurements.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()


def peaks(host: bool = True) -> dict:
    """This process's high-water marks since it started or since the last `reset_peaks()`; `host=False`
    where VmHWM could not be reset and would not be the phase's own."""
    rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"peak_rss": rss if host else None, "peak_gpu": torch.cuda.max_memory_allocated() if CUDA else None}


def reset_peaks() -> bool:
    """Start new high-water marks, so that one phase of a step gets peaks of its own: writing 5 to
    clear_refs resets VmHWM to the memory resident now (Linux 4.0+; some sandboxes refuse, then False)."""
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def sft(a: dict) -> dict:
    """QLoRA (LoRA on CPU) SFT for a few steps with the given switches; steady tokens/s and MFU are the
    medians after the first third of the steps (start-up, compilation). The final adapter's save is
    timed on its own, with its own peaks; the step's peaks are those of training."""
    from transformers import AutoConfig

    from fabrika.artifacts import RunContext, read_jsonl
    from fabrika.models import plan
    from fabrika.train import finetune, setup, sft as stage

    switches = dict(a["switches"])
    batching = switches.pop("batching")
    cfg = stage.CONFIG(model=a["model"], data=a["data"], method=a["method"], max_length=a["seq"], eval_fraction=0,
                       merge=False, template="llama3", batching=batching,
                       train={"max_steps": a["steps"], "batch_size": a["batch"], "grad_accum": a["accum"],
                              "logging_steps": 1, "eval_steps": None, "save_steps": 100000, "lr": 2e-4,
                              **switches, **({} if CUDA else {"peak_tflops": 0.14})})
    out: dict = {}
    save_final = finetune.save_final

    def timed_save(*args, **kwargs):
        out.update(peaks())
        own = reset_peaks()
        t = time.perf_counter()
        path = save_final(*args, **kwargs)
        out["save"] = {"seconds": time.perf_counter() - t, **peaks(host=own)}
        return path

    finetune.save_final = timed_save
    art = stage.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=a["out"], quiet=True))
    rows = [r for r in read_jsonl(Path(a["out"]) / "metrics.jsonl") if "tokens_per_s" in r]
    steady = rows[len(rows) // 3:] or rows
    m = art.metrics
    out.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
               mfu=statistics.median(r["mfu"] for r in steady) if all("mfu" in r for r in steady) else None,
               batching=m.get("batching"), loss_head=m.get("loss_head"), steps=m.get("steps"),
               adapter=str(art.path), eot=art.extra["eot"],
               attention=setup.attention(cfg.train, setup.check_device(cfg.train), fine_tuning=True))
    config = AutoConfig.from_pretrained(a["model"])  # the log's MFU counts 4N for adapters; 6N for comparison
    out["six_n_over_logged"] = plan.flops_per_token(config, a["seq"]) / plan.flops_per_token(
        config, a["seq"], frozen_weights=a["method"] != "full")
    return out


def answers(a: dict) -> dict:
    """MT-Bench answers on the engine fabrika picks (vLLM where installed); the time excludes loading."""
    from fabrika.evaluate import mtbench
    from fabrika.infer.backends import load_generator

    questions = mtbench.load_questions("mt_bench")[0][: a["questions"]]
    gen = load_generator("hf:" + a["model"])
    engine = "vLLM" if type(gen).__name__ == "VLLMGenerator" else "transformers"

    class Counting:  # the new tokens the engine reports
        tokens = 0

        def generate(self, convs, params):
            r = gen.generate(convs, params)
            Counting.tokens += sum(c.completion_tokens for choices in r for c in choices)
            return r

    t = time.perf_counter()
    done = mtbench.generate_answers(Counting(), questions, Path(a["out"]), "reference", a["tokens"], batch=80)
    seconds = time.perf_counter() - t
    if hasattr(gen, "close"):
        gen.close()
    return {"engine": engine, "turns": sum(len(x["choices"][0]["turns"]) for x in done), "new_tokens": Counting.tokens,
            "seconds": seconds}


def decode(a: dict) -> dict:
    """Milliseconds per decode step of the transformers generator on the same prompts, with the LoRA
    adapter applied on the fly (peft's wrapper: two more small matmuls per adapted linear, per token)
    and after peft's merge_and_unload folds it into the base weights. A step is the time of `tokens`
    new tokens less the time of one (the prefill), over tokens − 1; the best of two."""
    from peft import PeftModel

    from fabrika.evaluate import mtbench
    from fabrika.infer.backends import HFGenerator

    gen = HFGenerator(a["model"])  # the base; the adapter applied here, unmerged, whatever the loader does with one
    gen.model = PeftModel.from_pretrained(gen.model, a["adapter"]).to(gen.device).eval()
    questions = mtbench.load_questions("mt_bench")[0][: a["prompts"]]
    texts = [gen.tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True,
                                         tokenize=False) for q in questions]
    batch = gen.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(gen.device)
    n = a["tokens"]

    def seconds_for(new_tokens: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            gen.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               temperature=None, top_p=None, top_k=None, pad_token_id=gen.tok.pad_token_id)
        sync()
        return time.perf_counter() - t

    def ms_per_step() -> float:
        seconds_for(2)  # warm-up: kernels chosen, caches allocated
        return min((seconds_for(n) - seconds_for(1)) / (n - 1) for _ in range(2)) * 1000

    adapter_ms = ms_per_step()
    t = time.perf_counter()
    gen.model = gen.model.merge_and_unload()
    merge_seconds = time.perf_counter() - t
    return {"prompts": len(texts), "tokens": n, "adapter_ms": adapter_ms, "merged_ms": ms_per_step(),
            "merge_and_unload_s": merge_seconds}


def merge(a: dict) -> dict:
    """The SFT stage's own merge: the adapter folded into a fresh full-precision copy of the base, saved."""
    from transformers import AutoTokenizer

    from fabrika.models.model_dir import merge_adapter

    tokenizer = AutoTokenizer.from_pretrained(a["adapter"])
    t = time.perf_counter()
    merge_adapter(a["model"], Path(a["adapter"]), Path(a["out"]), tokenizer, a["eot"])
    return {"seconds": time.perf_counter() - t}


def convert(a: dict) -> dict:
    from fabrika.export import gguf

    gguf.convert(a["model"], a["out"], "f16")
    return {}


def quantize(a: dict) -> dict:
    from fabrika.export.stage import quantize as llama_quantize

    llama_quantize(Path(a["src"]), Path(a["out"]), "q4_k_m")
    return {}


STEPS = {"sft": sft, "answers": answers, "decode": decode, "merge": merge, "convert": convert, "quantize": quantize}


def main() -> None:
    a = json.loads(sys.argv[1])
    if a.get("cpus"):  # work that runs alongside the GPU's keeps to its share of the cores
        os.sched_setaffinity(0, a["cpus"])
        torch.set_num_threads(len(a["cpus"]))
    t = time.perf_counter()
    measured = STEPS[a["what"]](a)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, **peaks(), **measured}), flush=True)


if __name__ == "__main__":
    main()
