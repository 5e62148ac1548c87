"""Bad input, the way users get it wrong, through the installed `fabrika` executable.

Every case must end with exit status 2, a message that names the file, setting or row at fault, and
no traceback. The cases fail while loading or validating, before any training or network call, so
the whole table costs little more than starting the processes; they run two at a time, each in its
own directories, and are checked one by one.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from helpers import run_cli

CHAT_ROW = {"messages": [{"role": "user", "content": "Привет, как дела?"},
                         {"role": "assistant", "content": "Хорошо, спасибо."}]}
PAIR_ROW = {"prompt": "Say “hi”", "chosen": "Hi!", "rejected": "No."}
QUESTION = {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now in Russian."]}
ANSWER = {"question_id": 81, "answer_id": "a", "model_id": "m", "choices": [{"index": 0, "turns": ["x", "y"]}],
          "tstamp": 0}
JUDGMENT = {"question_id": 81, "model": "m", "judge": ["gpt-4", "single-v1"], "user_prompt": "", "judgment": "",
            "score": 7, "turn": 1, "tstamp": 0}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def pipeline(**stages) -> str:
    return yaml.safe_dump({"name": "bad", "run_dir": "{w}/runs", "stages": stages}, allow_unicode=True)


TOK_STAGE = {"kind": "tokenizer", "paths": ["{corpus}"], "vocab_size": 300}

# Files every case may use ({w} is the case's own directory; {model}, {tok}, {corpus} are real ones).
SHARED = {
    "chat.jsonl": jsonl(CHAT_ROW, CHAT_ROW),
    "pairs.jsonl": jsonl(PAIR_ROW),
    "empty.jsonl": "",
    "bad_line.jsonl": jsonl(CHAT_ROW, CHAT_ROW, '{"messages": [{"role": "user", "content": "cut'),
    "columns.jsonl": jsonl({"question": "2+2?", "answer": "4"}),
    "not_rows.jsonl": jsonl(["a", "list"]),
    "roles.jsonl": jsonl({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]}),
    "notes.txt": "not a dataset\n",
    "not_a_model/README.md": "just notes\n",
    "no_model_type/config.json": json.dumps({"hidden_size": 64, "num_hidden_layers": 2}),
    "broken_config/config.json": "{\"model_type\": \"llama\",",
    "questions.jsonl": jsonl(QUESTION),
    "questions_bad_json.jsonl": jsonl(QUESTION, "{question_id: 2}"),
    "questions_no_turns.jsonl": jsonl({"question_id": 1, "category": "x", "turns": "one string"}),
    "questions_empty.jsonl": "\n",
    "answers_bad.jsonl": jsonl({"question_id": 81, "model_id": "m"}),
    "answers.jsonl": jsonl(ANSWER),
    "judgments.jsonl": jsonl(JUDGMENT),
    "judgments_bad.jsonl": jsonl(JUDGMENT, "not json"),
    "prompts.txt": "Hello\n",
    "prompts_bad.jsonl": jsonl({"prompt": "hi"}, "{\"prompt\": "),
    "prompts_field.jsonl": jsonl({"text": "hi"}),
    "prompts_roles.jsonl": jsonl({"messages": [{"role": "robot", "content": "hi"}]}),
    "prompts_empty.txt": "\n\n",
    "not.gguf": "this is text, not GGUF",
    "empty_dir/.keep": "",
}


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str]  # substrings of stderr: the file, setting or row, and what was expected
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # --- run: pipeline files -----------------------------------------------------------------
    Case("run-missing-file", ["run", "{w}/nope.yaml"], ["nope.yaml", "not found"]),
    Case("run-not-yaml", ["run", "{w}/p.yaml"], ["p.yaml", "line 3", "not valid YAML"],
         {"p.yaml": "name: x\nstages: {tok: [\n"}),
    Case("run-list-at-top", ["run", "{w}/p.yaml"], ["p.yaml", "expected a mapping"], {"p.yaml": "- a\n- b\n"}),
    Case("run-unknown-top-key", ["run", "{w}/p.yaml"], ["p.yaml", "stagse", "did you mean 'stages'"],
         {"p.yaml": "name: x\nstagse: {}\n"}),
    Case("run-stage-name-dotdot", ["run", "{w}/p.yaml"], ["'../escape'", "letters, digits"],
         {"p.yaml": pipeline(**{"../escape": TOK_STAGE})}),
    Case("run-stage-name-slash", ["run", "{w}/p.yaml"], ["'a/b'", "not a usable stage name"],
         {"p.yaml": pipeline(**{"a/b": TOK_STAGE})}),
    Case("run-stage-name-parent", ["run", "{w}/p.yaml"], ["'..'", "not a usable stage name"],
         {"p.yaml": pipeline(**{"..": TOK_STAGE})}),
    Case("run-name-leaves-runs", ["run", "{w}/p.yaml"], ["name: '../../etc'", "or set run_dir"],
         {"p.yaml": "name: ../../etc\nstages: {tok: {kind: tokenizer, paths: [a]}}\n"}),
    Case("run-unknown-kind", ["run", "{w}/p.yaml"], ["stages.tok.kind", "did you mean 'tokenizer'"],
         {"p.yaml": pipeline(tok={**TOK_STAGE, "kind": "tokeniser"})}),
    Case("run-unknown-stage-key", ["run", "{w}/p.yaml"], ["stages.tok.vocab_sise", "did you mean 'vocab_size'"],
         {"p.yaml": pipeline(tok={"kind": "tokenizer", "paths": ["{corpus}"], "vocab_sise": 300})}),
    Case("run-wrong-type", ["run", "{w}/p.yaml"], ["stages.prep.shard_mb", "valid number"],
         {"p.yaml": pipeline(tok=TOK_STAGE, prep={"kind": "prepare", "tokenizer": "tok", "paths": ["{corpus}"],
                                                  "shard_mb": "big"})}),
    Case("run-negative-number", ["run", "{w}/p.yaml"], ["stages.prep.val_fraction", "greater than or equal to 0"],
         {"p.yaml": pipeline(tok=TOK_STAGE, prep={"kind": "prepare", "tokenizer": "tok", "paths": ["{corpus}"],
                                                  "val_fraction": -0.1})}),
    Case("run-stage-not-mapping", ["run", "{w}/p.yaml"], ["stages.tok", "valid dictionary"],
         {"p.yaml": pipeline(tok="tokenizer")}),
    Case("run-reference-typo", ["run", "{w}/p.yaml"], ["'tokk' is not a stage", "did you mean 'tok'"],
         {"p.yaml": pipeline(tok=TOK_STAGE, prep={"kind": "prepare", "tokenizer": "tokk", "paths": ["{corpus}"]})}),
    Case("run-undefined-variable", ["run", "{w}/p.yaml"], ["${nmae}", "no top-level key"],
         {"p.yaml": "name: x\nrun_dir: runs/${nmae}\nstages: {tok: {kind: tokenizer, paths: [a]}}\n"}),
    Case("run-bad-set", ["run", "{w}/p.yaml", "--set", "seed"], ["--set 'seed'", "KEY=VALUE"],
         {"p.yaml": pipeline(tok=TOK_STAGE)}),
    Case("run-only-unknown", ["run", "{w}/p.yaml", "--only", "tokn"], ["no stage named 'tokn'", "did you mean 'tok'"],
         {"p.yaml": pipeline(tok=TOK_STAGE)}),
    Case("run-cycle", ["run", "{w}/p.yaml"], ["p.yaml", "cycle"],
         {"p.yaml": pipeline(a={"kind": "prepare", "tokenizer": "b", "paths": ["{corpus}"]},
                             b={"kind": "prepare", "tokenizer": "a", "paths": ["{corpus}"]})}),
    Case("status-not-a-run", ["status", "{w}/empty_dir"], ["empty_dir", "not a run directory"]),
    Case("report-not-a-run", ["report", "{w}/empty_dir"], ["empty_dir", "not a run directory"]),
    # --- collect -------------------------------------------------------------------------------
    Case("collect-missing-config", ["collect", "-c", "{w}/c.yaml", "-o", "{w}/o"], ["c.yaml", "not found"]),
    Case("collect-unknown-key", ["collect", "-c", "{w}/c.yaml", "-o", "{w}/o"], ["teachr", "did you mean 'teacher'"],
         {"c.yaml": "source: {w}/chat.jsonl\nteachr: openai:gpt-4o\n"}),
    Case("collect-bad-quota", ["collect", "--source", "{w}/chat.jsonl", "--teacher", "openai:m@http://127.0.0.1:9",
                               "--quota", "ru=lots", "-o", "{w}/o"], ["quota", "LANG=N"]),
    Case("collect-zero-answers", ["collect", "--source", "{w}/chat.jsonl", "--teacher", "openai:m@http://127.0.0.1:9",
                                  "--set", "n=0", "-o", "{w}/o"], ["n:", "greater than or equal to 1"]),
    Case("collect-unknown-filter", ["collect", "-c", "{w}/c.yaml", "-o", "{w}/o"],
         ["filters.0", "'refusal', 'truncated'", "(got 'lenght')"],
         {"c.yaml": "source: {w}/chat.jsonl\nteacher: openai:m@http://127.0.0.1:9\nfilters: [lenght]\n"}),
    Case("collect-missing-source", ["collect", "--source", "{w}/nope.jsonl", "--teacher",
                                    "openai:m@http://127.0.0.1:9", "-o", "{w}/o"], ["nope.jsonl", "no such file"]),
    Case("collect-empty-source", ["collect", "--source", "{w}/empty.jsonl", "--teacher",
                                  "openai:m@http://127.0.0.1:9", "-o", "{w}/o"], ["empty.jsonl", "empty"]),
    # --- sft -----------------------------------------------------------------------------------
    Case("sft-missing-model", ["sft", "-m", "{w}/nope", "-d", "{w}/chat.jsonl", "-o", "{w}/o"],
         ["sft.model", "nope not found"]),
    Case("sft-dir-not-a-model", ["sft", "-m", "{w}/not_a_model", "-d", "{w}/chat.jsonl", "-o", "{w}/o"],
         ["sft.model", "not_a_model", "no config.json"]),
    Case("sft-config-without-model-type", ["sft", "-m", "{w}/no_model_type", "-d", "{w}/chat.jsonl", "-o", "{w}/o"],
         ["no_model_type/config.json", "model_type"]),
    Case("sft-config-not-json", ["sft", "-m", "{w}/broken_config", "-d", "{w}/chat.jsonl", "-o", "{w}/o"],
         ["broken_config/config.json", "not valid JSON"]),
    Case("sft-model-is-a-file", ["sft", "-m", "{w}/notes.txt", "-d", "{w}/chat.jsonl", "-o", "{w}/o"],
         ["notes.txt is a file"]),
    Case("sft-missing-data", ["sft", "-m", "{model}", "-d", "{w}/nope.jsonl", "-o", "{w}/o"],
         ["nope.jsonl", "no such file"]),
    Case("sft-empty-data", ["sft", "-m", "{model}", "-d", "{w}/empty.jsonl", "-o", "{w}/o"],
         ["empty.jsonl", "empty"]),
    Case("sft-bad-line", ["sft", "-m", "{model}", "-d", "{w}/bad_line.jsonl", "-o", "{w}/o"],
         ["bad_line.jsonl:3", "not valid JSON"]),
    Case("sft-wrong-columns", ["sft", "-m", "{model}", "-d", "{w}/columns.jsonl", "-o", "{w}/o"],
         ["columns.jsonl", "row 0", "'answer', 'question'"]),
    Case("sft-rows-not-objects", ["sft", "-m", "{model}", "-d", "{w}/not_rows.jsonl", "-o", "{w}/o"],
         ["not_rows.jsonl", "row 0", "not a conversation"]),
    Case("sft-roles-out-of-order", ["sft", "-m", "{model}", "-d", "{w}/roles.jsonl", "-o", "{w}/o"],
         ["roles.jsonl", "row 0", "roles out of order"]),
    Case("sft-unsupported-file-type", ["sft", "-m", "{model}", "-d", "{w}/notes.txt", "-o", "{w}/o"],
         ["notes.txt", "unsupported file type"]),
    Case("sft-unknown-method", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--method", "dora", "-o", "{w}/o"],
         ["method", "'full', 'lora' or 'qlora'"]),
    Case("sft-unknown-template", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--template", "vicuna",
                                  "-o", "{w}/o"], ["template", "'chatml', 'llama3', 'mistral' or 'tokenizer'"]),
    Case("sft-negative-lr", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--set", "train.lr=-1e-4",
                             "-o", "{w}/o"], ["train.lr", "greater than 0"]),
    Case("sft-zero-lora-rank", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--set", "lora.r=0", "-o", "{w}/o"],
         ["lora.r", "greater than or equal to 1"]),
    Case("sft-negative-steps", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--set", "train.max_steps=-5",
                                "-o", "{w}/o"], ["train", "max_steps must be at least 1"]),
    Case("sft-typo-in-train", ["sft", "-c", "{w}/s.yaml", "-o", "{w}/o"], ["train.epocs", "did you mean 'epochs'"],
         {"s.yaml": "model: {model}\ndata: {w}/chat.jsonl\ntrain: {epocs: 2}\n"}),
    Case("sft-qlora-on-cpu", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--method", "qlora", "-o", "{w}/o"],
         ["sft.method", "needs a CUDA GPU"]),
    Case("sft-fp16-on-cpu", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--set", "train.precision=fp16",
                             "-o", "{w}/o"], ["train.precision", "needs a CUDA GPU"]),
    Case("sft-flash-attention-on-cpu", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--set",
                                        "train.attn_implementation=flash_attention_2", "-o", "{w}/o"],
         ["train.attn_implementation", "needs a CUDA GPU"]),
    Case("sft-liger-on-cpu", ["sft", "-m", "{model}", "-d", "{w}/chat.jsonl", "--set", "train.liger_kernel=true",
                              "-o", "{w}/o"], ["train.liger_kernel", "CUDA GPUs"]),
    # --- prefer --------------------------------------------------------------------------------
    Case("prefer-dir-not-a-model", ["prefer", "-m", "{w}/not_a_model", "-d", "{w}/pairs.jsonl", "-o", "{w}/o"],
         ["prefer.model", "no config.json"]),
    Case("prefer-wrong-columns", ["prefer", "-m", "{model}", "-d", "{w}/chat.jsonl", "-o", "{w}/o"],
         ["chat.jsonl", "lacks column(s) prompt, chosen, rejected"]),
    Case("prefer-empty-data", ["prefer", "-m", "{model}", "-d", "{w}/empty.jsonl", "-o", "{w}/o"],
         ["empty.jsonl", "empty"]),
    Case("prefer-unknown-loss", ["prefer", "-m", "{model}", "-d", "{w}/pairs.jsonl", "--loss", "kto", "-o", "{w}/o"],
         ["loss", "'dpo', 'ipo', 'orpo' or 'simpo'"]),
    Case("prefer-zero-beta", ["prefer", "-m", "{model}", "-d", "{w}/pairs.jsonl", "--set", "beta=0", "-o", "{w}/o"],
         ["beta", "greater than 0"]),
    # --- eval ----------------------------------------------------------------------------------
    Case("eval-unknown-bench", ["eval", "mtbench", "--answers", "{w}/answers.jsonl", "--bench", "mt_bench_ru",
                                "--judge", "openai:j@http://127.0.0.1:9", "-o", "{w}/o"],
         ["mt_bench_ru", "neither a packaged bench"]),
    Case("eval-question-bad-json", ["eval", "mtbench", "--answers", "{w}/answers.jsonl", "--bench",
                                    "{w}/questions_bad_json.jsonl", "--judge", "openai:j@http://127.0.0.1:9",
                                    "-o", "{w}/o"], ["questions_bad_json.jsonl:2", "not valid JSON"]),
    Case("eval-question-format", ["eval", "mtbench", "--answers", "{w}/answers.jsonl", "--bench",
                                  "{w}/questions_no_turns.jsonl", "--judge", "openai:j@http://127.0.0.1:9",
                                  "-o", "{w}/o"], ["questions_no_turns.jsonl:1", "turns"]),
    Case("eval-question-file-empty", ["eval", "mtbench", "--answers", "{w}/answers.jsonl", "--bench",
                                      "{w}/questions_empty.jsonl", "--judge", "openai:j@http://127.0.0.1:9",
                                      "-o", "{w}/o"], ["questions_empty.jsonl", "no questions"]),
    Case("eval-answers-malformed", ["eval", "mtbench", "--answers", "{w}/answers_bad.jsonl", "--bench",
                                    "{w}/questions.jsonl", "--judge", "openai:j@http://127.0.0.1:9", "-o", "{w}/o"],
         ["answers_bad.jsonl:1", "not a FastChat model answer"]),
    Case("eval-answers-missing", ["eval", "mtbench", "--answers", "{w}/nope.jsonl", "--bench", "{w}/questions.jsonl",
                                  "--judge", "openai:j@http://127.0.0.1:9", "-o", "{w}/o"],
         ["nope.jsonl", "not found"]),
    Case("eval-zero-questions", ["eval", "mtbench", "--answers", "{w}/answers.jsonl", "--questions", "0",
                                 "-o", "{w}/o"], ["mtbench.questions", "greater than or equal to 1"]),
    Case("eval-unknown-judge-prompts", ["eval", "mtbench", "--answers", "{w}/answers.jsonl", "--set",
                                        "mtbench.prompts=gpt4", "-o", "{w}/o"],
         ["mtbench.prompts", "'auto', 'fastchat' or 'multilingual'"]),
    Case("eval-pairwise-without-baseline", ["eval", "mtbench", "--answers", "{w}/answers.jsonl", "--mode",
                                            "pairwise", "-o", "{w}/o"], ["mtbench", "set baseline"]),
    Case("eval-bad-model-ref", ["eval", "mtbench", "-m", "llama:7b", "--bench", "{w}/questions.jsonl",
                                "--judge", "openai:j@http://127.0.0.1:9", "-o", "{w}/o"],
         ["'llama:7b'", "hf:PATH_OR_ID, vllm:PATH_OR_ID, gguf:FILE or openai:MODEL"]),
    Case("eval-perplexity-of-an-api-model", ["run", "{w}/p.yaml"], ["perplexity of openai:gpt-4o", "full logits"],
         {"p.yaml": pipeline(ev={"kind": "evaluate", "model": "openai:gpt-4o",
                                 "perplexity": {"data": "{w}/notes.txt"}})}),
    Case("eval-show-missing", ["eval", "show", "{w}/nope.jsonl"], ["nope.jsonl"]),
    Case("eval-show-bad-line", ["eval", "show", "{w}/judgments_bad.jsonl"], ["judgments_bad.jsonl"]),
    # --- export --------------------------------------------------------------------------------
    Case("export-missing-model", ["export", "{w}/nope", "-o", "{w}/o"], ["export.model", "nope not found"]),
    Case("export-dir-not-a-model", ["export", "{w}/not_a_model", "-o", "{w}/o"], ["not_a_model", "no config.json"]),
    Case("export-config-without-model-type", ["export", "{w}/no_model_type", "-o", "{w}/o"],
         ["no_model_type/config.json", "model_type"]),
    Case("export-unknown-quant", ["export", "{model}", "--quant", "q4_k_zz", "-o", "{w}/o"],
         ["q4_k_zz", "unknown type", "q4_k_m"]),
    Case("export-unknown-base-type", ["export", "{model}", "--set", "base_type=q8_0", "-o", "{w}/o"],
         ["base_type", "'f16', 'bf16' or 'f32'", "(got 'q8_0')"]),
    Case("export-missing-imatrix", ["export", "{model}", "--imatrix", "{w}/calib.txt", "-o", "{w}/o"],
         ["export.imatrix", "calib.txt is not a file"]),
    Case("export-name-escapes", ["export", "{model}", "--set", "name=../../model", "-o", "{w}/o"],
         ["name", "should match pattern", "../../model"]),
    # --- chat, serve, compare ------------------------------------------------------------------
    Case("chat-dir-not-a-model", ["chat", "hf:{w}/not_a_model", "--query", "hi"], ["not_a_model", "no config.json"]),
    Case("chat-config-without-model-type", ["chat", "hf:{w}/no_model_type", "--query", "hi"],
         ["no_model_type/config.json", "model_type"]),
    Case("chat-model-without-tokenizer", ["chat", "hf:{w}/weights_only", "--query", "hi"],
         ["weights_only", "holds no tokenizer"], {"weights_only/config.json": json.dumps({"model_type": "llama"})}),
    Case("chat-missing-gguf", ["chat", "gguf:{w}/nope.gguf", "--query", "hi"], ["nope.gguf", "no such file"]),
    Case("chat-not-a-gguf", ["chat", "gguf:{w}/not.gguf", "--query", "hi"], ["not.gguf"]),
    Case("chat-unknown-scheme", ["chat", "ollama:llama3", "--query", "hi"], ["'ollama:llama3'", "hf:PATH_OR_ID"]),
    Case("chat-zero-tokens", ["chat", "hf:{model}", "--query", "hi", "--max-tokens", "0"],
         ["max_new_tokens", "greater than or equal to 1"]),
    Case("serve-dir-not-a-model", ["serve", "hf:{w}/not_a_model", "--port", "0"], ["not_a_model", "no config.json"]),
    Case("serve-missing-gguf", ["serve", "gguf:{w}/nope.gguf", "--port", "0"], ["nope.gguf"]),
    Case("compare-missing-prompts", ["compare", "hf:{model}", "hf:{model}", "--prompts", "{w}/nope.txt"],
         ["--prompts", "nope.txt", "not found"]),
    Case("compare-bad-jsonl-line", ["compare", "hf:{model}", "hf:{model}", "--prompts", "{w}/prompts_bad.jsonl"],
         ["prompts_bad.jsonl:2", "not valid JSON"]),
    Case("compare-wrong-field", ["compare", "hf:{model}", "hf:{model}", "--prompts", "{w}/prompts_field.jsonl"],
         ["prompts_field.jsonl:1", "`prompt` or `messages`"]),
    Case("compare-bad-role", ["compare", "hf:{model}", "hf:{model}", "--prompts", "{w}/prompts_roles.jsonl"],
         ["prompts_roles.jsonl:1", "unknown role 'robot'"]),
    Case("compare-no-prompts", ["compare", "hf:{model}", "hf:{model}", "--prompts", "{w}/prompts_empty.txt"],
         ["prompts_empty.txt", "no prompts"]),
    Case("compare-dir-not-a-model", ["compare", "hf:{w}/not_a_model", "hf:{model}", "--prompts", "{w}/prompts.txt"],
         ["not_a_model", "no config.json"]),
    # --- plan ----------------------------------------------------------------------------------
    Case("plan-unknown-gpu", ["plan", "--gpu", "tpu", "--tokens", "1e9"], ["tpu", "h100"]),
    Case("plan-unknown-size", ["plan", "--size", "9t", "--tokens", "1e9"], ["9t", "8b"]),
    Case("plan-unknown-arch", ["plan", "--arch", "lama", "--tokens", "1e9"], ["lama", "llama"]),
    Case("plan-zero-gpus", ["plan", "--gpus", "0", "--tokens", "1e9"], ["--gpus", "at least 1"]),
    Case("plan-mfu-above-one", ["plan", "--mfu", "1.5", "--tokens", "1e9"], ["--mfu in (0, 1]"]),
    Case("plan-negative-tokens", ["plan", "--tokens", "-5"], ["--tokens", "positive"]),
    Case("plan-config-without-model-type", ["plan", "--model", "{w}/no_model_type", "--tokens", "1e9"],
         ["no_model_type/config.json", "model_type"]),
    # --- prepare, tokenizer, pretrain ----------------------------------------------------------
    Case("prepare-missing-tokenizer", ["prepare", "{corpus}", "-t", "{w}/nope", "-o", "{w}/o"],
         ["tokenizer", "nope not found"]),
    Case("prepare-dir-not-a-tokenizer", ["prepare", "{corpus}", "-t", "{w}/not_a_model", "-o", "{w}/o"],
         ["not_a_model", "holds no tokenizer"]),
    Case("prepare-missing-text", ["prepare", "{w}/nope.txt", "-t", "{tok}", "-o", "{w}/o"], ["nope.txt"]),
    Case("prepare-zero-shard", ["prepare", "{corpus}", "-t", "{tok}", "--shard-mb", "0", "-o", "{w}/o"],
         ["shard_mb", "greater than 0"]),
    Case("prepare-empty-text", ["prepare", "{w}/empty.txt", "-t", "{tok}", "-o", "{w}/o"], ["no training text"],
         {"empty.txt": "\n\n"}),
    Case("tokenizer-missing-text", ["tokenizer", "{w}/nope.txt", "-o", "{w}/o"], ["nope.txt"]),
    Case("tokenizer-zero-vocab", ["tokenizer", "{corpus}", "--vocab-size", "0", "-o", "{w}/o"], ["vocab_size"]),
    Case("tokenizer-unknown-template", ["tokenizer", "{corpus}", "--set", "chat_template=vicuna", "-o", "{w}/o"],
         ["vicuna", "chatml"]),
    Case("pretrain-missing-data", ["pretrain", "-d", "{w}/nope", "-o", "{w}/o"], ["nope"]),
    Case("pretrain-unprepared-data", ["pretrain", "-d", "{w}/empty_dir", "-o", "{w}/o"],
         ["empty_dir", "not a prepared dataset"]),
    Case("pretrain-unknown-arch", ["pretrain", "-d", "{w}/empty_dir", "--arch", "lama", "-o", "{w}/o"],
         ["model.arch", "'llama', 'mistral'", "(got 'lama')"]),
    Case("pretrain-zero-seq-len", ["pretrain", "-d", "{w}/empty_dir", "--seq-len", "0", "-o", "{w}/o"],
         ["seq_len", "greater than or equal to 8"]),
    Case("pretrain-lr-not-a-number", ["pretrain", "-d", "{w}/empty_dir", "--set", "train.lr=fast", "-o", "{w}/o"],
         ["train.lr", "valid number"]),
    Case("accelerate-config-unknown", ["accelerate-config", "zero9"], ["zero9", "shipped"]),
]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, chat_model, tiny_tokenizer, small_corpus):
    """Run the selected cases (two processes at a time); each case gets its own directory."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if "case" in getattr(getattr(item, "callspec", None), "params", {})}
    root = tmp_path_factory.mktemp("bad_input")
    names = {"model": str(chat_model), "tok": str(tiny_tokenizer), "corpus": str(small_corpus)}

    def place(text: str, w: Path) -> str:
        for key, value in {**names, "w": str(w)}.items():
            text = text.replace("{" + key + "}", value)
        return text

    def one(case: Case):
        w = root / case.id
        for name, text in {**SHARED, **case.files}.items():
            (w / name).parent.mkdir(parents=True, exist_ok=True)
            (w / name).write_text(place(text, w), encoding="utf-8")
        return run_cli(*[place(a, w) for a in case.argv], cwd=w, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **case.env})

    todo = [c for c in CASES if c.id in selected]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((c.id for c in todo), pool.map(one, todo)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_with_a_message(outcomes, case):
    r = outcomes[case.id]
    shown = f"exit {r.returncode}\nstderr:\n{r.stderr[-3000:]}\nstdout:\n{r.stdout[-1000:]}"
    assert "Traceback" not in r.stderr, shown
    assert r.returncode == 2, shown
    message = " ".join(r.stderr.split())
    missing = [s for s in case.expect if s not in message]
    assert not missing, f"{missing} not in the message\n{shown}"


def test_the_table_covers_the_commands_users_get_wrong():
    commands = {" ".join(c.argv[:2]) if c.argv[0] == "eval" else c.argv[0] for c in CASES}
    assert len(CASES) >= 60 and {"run", "collect", "sft", "prefer", "eval mtbench", "eval show", "export", "chat",
                                 "serve", "compare", "plan", "prepare", "tokenizer", "pretrain"} <= commands
    assert len({c.id for c in CASES}) == len(CASES)
