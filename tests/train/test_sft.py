"""SFT and preference tuning on tiny models with real optimizer steps, and the template contract:
what the model learned comes back through `fabrika chat`, and generation stops by itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_cli, write_jsonl

from fabrika.artifacts import RunContext, read_manifest
from fabrika.config import load
from fabrika.errors import FabrikaError
from fabrika.train import finetune, prefer, sft

FACTS = [("What is the capital of Zubrovia?", "Brelsk is the capital."),
         ("Кто написал Онегина?", "Пушкин написал."),
         ("谁写了论语？", "孔子的弟子。")]


def facts_data(tmp_path: Path, fmt: str = "messages") -> Path:
    rows = []
    for q, a in FACTS:
        if fmt == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        else:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return write_jsonl(tmp_path / f"facts-{fmt}.jsonl", rows * 4)


def run_sft(tmp_path: Path, base: Path, data, name="sft", **overrides):
    cfg = {"model": str(base), "data": data, "max_length": 128, "eval_fraction": 0,
           "train": {"max_steps": 60, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0,
                     "logging_steps": 10, "save_steps": 1000, "eval_steps": None}}
    for k, v in overrides.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load(sft.CONFIG, path), path


def test_full_sft_memorises_and_stops_through_chat(tmp_path, plain_base):
    cfg, _ = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), method="full", train={"max_steps": 160})
    art = sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "out", quiet=True))
    model_dir = art.path
    assert art.metrics["loss_head"] == "labelled positions"  # on CPU, not TRL's every-position kernel
    assert art.metrics["weights_dtype"] == "fp32" and art.metrics["lr"] == 1e-2  # the lr given, not full's default
    assert art.metrics["devices"] == {"0": {"local_rank": 0, "device": "cpu"}} and art.metrics["world_size"] == 1
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_end|>" in json.dumps(tok_cfg) or "<|im_end|>" in (model_dir / "tokenizer.json").read_text()
    assert (model_dir / "chat_template.jinja").exists() or "chat_template" in tok_cfg
    from transformers import AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen["eos_token_id"]
    for q, a in FACTS[:2]:
        r = run_cli("chat", f"hf:{model_dir}", "--query", q, "--max-tokens", "40")
        assert r.returncode == 0, r.stderr[-2000:]
        answer = r.stdout.strip()
        assert answer == a, (q, answer)  # exactly the answer: it stopped at <|im_end|> by itself


def test_training_arguments_exist_before_the_model_loads(tmp_path, plain_base, monkeypatch):
    """They tell from_pretrained to shard (DeepSpeed ZeRO-3's zero.Init, FSDP's loading on one rank):
    built after it, every rank would first load the whole model (see setup.trainer_arguments)."""
    from transformers import AutoModelForCausalLM

    from fabrika.train import setup

    events: list[str] = []
    real_arguments, real_load = setup.trainer_arguments, AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(setup, "trainer_arguments",
                        lambda *a, **k: events.append("arguments") or real_arguments(*a, **k))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: events.append("model") or real_load(*a, **k))
    cfg, _ = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), method="full", train={"max_steps": 1})
    sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "out", quiet=True))
    assert events[:2] == ["arguments", "model"]


def test_auto_kernels_on_a_cpu_machine():
    from fabrika.train import setup

    params = setup.TrainParams()
    assert setup.attention(params, "bf16", fine_tuning=True) == "sdpa"  # flash attention needs CUDA
    assert setup.attention(params.model_copy(update={"attn_implementation": "eager"}), "bf16", True) == "eager"
    assert sft.batching_mode(sft.CONFIG(model="m", data="d.jsonl"), "fp32") == "grouped"


def test_lora_sharegpt_with_adapter_and_merge(tmp_path, plain_base):
    cfg, _ = run_sft(tmp_path, plain_base, str(facts_data(tmp_path, "sharegpt")), method="lora",
                     lora={"r": 8, "alpha": 16}, train={"max_steps": 20, "lr": 5e-3})
    art = sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "out", quiet=True))
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model" / "model.safetensors").exists()
    assert art.path == out / "model"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(art.path)  # merged model loads with plain transformers
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["overlong"] == 0 and list(stats["sources"].values())[0]["rows"] == 12


@pytest.mark.parametrize("template,trained", [("chatml", "hello<|im_end|>"), ("llama3", "hello<|eot_id|>"),
                                              ("mistral", " hello<|endoftext|>")])
def test_assistant_only_loss_masks_the_prompt(plain_base, template, trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain_base)
    eot, _ = finetune.apply_template(tok, template, need_generation_marker=True)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == trained
    assert trained.endswith(eot)  # the token training ends each answer with is the one generation stops at


def test_mixing_weights_and_overlong_drop(tmp_path, plain_base):
    long = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "word " * 200},
                                                               {"role": "assistant", "content": "ok"}]}] * 3)
    cfg, _ = run_sft(tmp_path, plain_base, [{"path": str(facts_data(tmp_path)), "weight": 0.5},
                                            {"path": str(long), "weight": 2.0}])
    convs, stats = sft.load_conversations(cfg, RunContext(stage="s", kind="sft", stage_dir=tmp_path), 0)
    assert [s["used"] for s in stats["sources"].values()] == [6, 6]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain_base)
    finetune.apply_template(tok, "chatml", True)
    kept, ls = sft.split_by_length(convs, tok, 128, "drop")
    assert len(kept) == 6 and ls["overlong"] == 6


def test_bad_inputs(tmp_path, plain_base):
    ctx = RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "o", quiet=True)
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    cfg, _ = run_sft(tmp_path, plain_base, str(no_answer))
    with pytest.raises(FabrikaError, match="no usable conversation.*no assistant answer"):
        sft.run(cfg, ctx)
    cfg, path = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), lora={"target": ["q_proj", "qkv"]})
    with pytest.raises(FabrikaError, match="qkv not in this model.*q_proj"):
        sft.run(cfg, ctx)
    r = run_cli("sft", "--config", str(path), "--out", str(tmp_path / "q"), "--set", "method=qlora",
                "--set", "lora.target=all-linear")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "method: lora" in r.stderr
    cfg, _ = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), template="tokenizer")
    with pytest.raises(FabrikaError, match="no chat template"):
        sft.run(cfg, ctx)
    r = run_cli("sft", "--model", str(tmp_path / "missing"), "--data", str(facts_data(tmp_path)),
                "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("loss, method, reference", [("dpo", "lora", "adapter disabled"), ("orpo", "lora", "none"),
                                                    ("dpo", "full", "precomputed log-probs")])
def test_prefer_from_sft(tmp_path, plain_base, loss, method, reference):
    """Full DPO takes its reference log-probabilities from one pass before training, not from a second
    copy of the model."""
    cfg, _ = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), method="full", train={"max_steps": 10})
    base = sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "sft", quiet=True)).path
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(24)])
    pcfg = prefer.CONFIG(model=str(base), data=str(pairs), loss=loss, method=method, max_length=64,
                         train={"max_steps": 6, "batch_size": 4, "lr": 1e-3, "logging_steps": 2, "eval_steps": 3,
                                "save_steps": 100, "peak_tflops": 1.0})
    art = prefer.run(pcfg, RunContext(stage="prefer", kind="prefer", stage_dir=tmp_path / "p", quiet=True))
    m = read_manifest(tmp_path / "p")["metrics"]
    assert m["steps"] == 6 and "rewards/margins" in m and "eval_loss" in m
    # speed is counted as in every training stage: tokens/s, and MFU once a peak is known (given here)
    assert m["tokens_per_s"] > 0 and m["mfu"] > 0
    assert m["reference"] == reference and m["lr"] == 1e-3  # the lr given is kept, full or not
    assert (art.path / "model.safetensors").exists() and art.path.name == "model"
    # the model's own template (prefer's default) keeps sft's end of turn: answers still stop there
    from transformers import AutoTokenizer, GenerationConfig

    im_end = AutoTokenizer.from_pretrained(art.path).convert_tokens_to_ids("<|im_end|>")
    assert art.extra["eot"] == "<|im_end|>" and im_end in GenerationConfig.from_pretrained(art.path).eos_token_id


def test_prefer_rejects_data_without_pair_columns(tmp_path, plain_base):
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(FabrikaError, match="lacks column.*chosen, rejected"):
        prefer.load_pairs(str(bad), "train")


def _losses(out: Path) -> dict[int, float]:
    from fabrika.artifacts import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def test_killed_sft_resumes_exactly(tmp_path, plain_base):
    _, path = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), method="lora", lora={"r": 8, "alpha": 16},
                      train={"max_steps": 12, "lr": 5e-3, "logging_steps": 1, "save_steps": 4})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("sft", "--config", str(path), "--out", str(straight), "--quiet").returncode == 0
    r = run_cli("sft", "--config", str(path), "--out", str(resumed), "--quiet", env={"FABRIKA_FAULT": "kill_at_step=6"})
    assert r.returncode == -9, r.stderr[-3000:]  # killed after step 6; the last checkpoint is step 4
    assert read_manifest(resumed) is None and max(_losses(resumed)) > 4  # logged past its checkpoint
    r = run_cli("sft", "--config", str(path), "--out", str(resumed), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step


def test_sft_with_two_cpu_processes(tmp_path, plain_base):
    import socket
    import sys

    _, path = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), method="lora", lora={"r": 8, "alpha": 16},
                      train={"max_steps": 4, "batch_size": 2, "logging_steps": 1})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "fabrika.cli"]
    out = tmp_path / "ddp"
    r = run_cli("sft", "--config", str(path), "--out", str(out), launcher=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    # every rank takes part in the final save (a collective under FSDP and ZeRO-3), none returns before it
    for rank in (0, 1):
        assert f"rank {rank} of 2 (local rank {rank}, cpu): final adapter saved" in r.stdout, r.stdout[-3000:]
    m = read_manifest(out)
    assert m["metrics"]["world_size"] == 2 and (out / "model" / "model.safetensors").exists()
    # a stand-alone command under a launcher: each rank in its own place, as the launcher numbered it
    assert m["metrics"]["devices"] == {"0": {"local_rank": 0, "device": "cpu"}, "1": {"local_rank": 1, "device": "cpu"}}
    assert (out / "adapter" / "adapter_config.json").exists() and sorted(_losses(out)) == [1, 2, 3, 4]


def test_adapter_without_its_base_and_template_without_generation_markers(tmp_path, plain_base):
    import shutil

    cfg, _ = run_sft(tmp_path, plain_base, str(facts_data(tmp_path)), method="lora", lora={"r": 4, "alpha": 8},
                     train={"max_steps": 2})
    out = sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "out", quiet=True)).dir
    adapter = tmp_path / "moved-adapter"
    shutil.copytree(out / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    r = run_cli("sft", "--model", str(adapter), "--data", str(facts_data(tmp_path)), "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "names base model" in r.stderr and "gone" in r.stderr
    r = run_cli("export", str(adapter), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "names base model" in r.stderr

    plain_template = tmp_path / "plain-template"
    shutil.copytree(plain_base, plain_template)
    tok_cfg = json.loads((plain_template / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (plain_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg, _ = run_sft(tmp_path, plain_template, str(facts_data(tmp_path)), template="tokenizer")
    with pytest.raises(FabrikaError, match="assistant_only_loss: false"):
        sft.run(cfg, RunContext(stage="sft", kind="sft", stage_dir=tmp_path / "t", quiet=True))
