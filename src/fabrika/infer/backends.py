"""One way to ask any model for answers: `generate(conversations, params) -> completions`.

A model reference (models/refs.py) picks the backend, so collection and evaluation never care where a model
runs:
  hf:PATH_OR_HUB_ID      transformers (batched, left padding, the tokenizer's chat template; a LoRA
                         adapter directory loads on its base model)
  gguf:FILE              llama.cpp through llama-cpp-python (chat template from the GGUF metadata)
  vllm:PATH_OR_HUB_ID    the same model on vLLM's server, started by fabrika (see vllm_engine.py); an hf:
                         model runs on vLLM too when the engine setting (FABRIKA_ENGINE, `engine:`) says so
  openai:MODEL[@URL]     any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, TGI, Ollama,
                         `fabrika serve`), through fabrika's client with retries, limits and a cache
A bare directory means hf:, a bare *.gguf path means gguf:.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Generator as Steps

from fabrika.errors import FabrikaError
from fabrika.infer.client import ClientConfig, run_requests, stream_chat
from fabrika.infer.generation import (Completion, ContextTooLong, ConversationRejected, GenerationParams, Generator,
                                      Messages)
from fabrika.models.checks import check_model_dir, check_tokenizer_dir
from fabrika.models.model_dir import adapter_base
from fabrika.models.refs import parse_ref


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def refuse_oversized(conversation: Messages, context: int, longest_token_bytes: int) -> None:
    """No token holds more than `longest_token_bytes` bytes of text, so messages of more than context times
    that many bytes cannot fit: they are refused before the tokenizer spends seconds and gigabytes on them."""
    size = sum(len(m["content"].encode("utf-8")) for m in conversation)
    if size > context * longest_token_bytes:
        raise ContextTooLong(f"the messages hold {size:,} bytes of text, more than the model's context of {context} "
                             f"tokens can take (its longest token is {longest_token_bytes} bytes)")


def _too_long(n: int, max_new_tokens: int, context: int) -> ContextTooLong:
    return ContextTooLong(f"the prompt has {n} tokens and max_tokens is {max_new_tokens}: more than the "
                          f"model's context of {context} tokens")


class HFGenerator:
    """transformers generation, batched with left padding; stops at the template's end of turn.

    The weights load straight onto the device (no full copy in CPU memory first), in bfloat16 on a GPU
    (float16 on one without it) and in the checkpoint's own dtype on CPU, unless `dtype` says otherwise.
    A LoRA adapter is merged into its base model once, at load: left unmerged, every decode step of
    every answer would run the adapter's extra low-rank matrix products beside each adapted layer, for
    weights that never change while serving."""

    def __init__(self, path: str, device: str | None = None, dtype: str = "auto", max_batch: int = 16) -> None:
        check_model_dir(path, f"hf:{path}")
        check_tokenizer_dir(path, f"hf:{path}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = Path(path).name or path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto" and self.device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        placed = {"dtype": dtype, "device_map": self.device}
        base = adapter_base(path, f"hf:{path}")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, padding_side="left")
            if base is not None:
                from peft import PeftModel

                model = AutoModelForCausalLM.from_pretrained(base, **placed)
                if len(self.tok) != model.get_input_embeddings().num_embeddings:
                    model.resize_token_embeddings(len(self.tok))
                model = PeftModel.from_pretrained(model, path).merge_and_unload()
            else:
                model = AutoModelForCausalLM.from_pretrained(path, **placed)
        except (OSError, ValueError) as e:
            raise FabrikaError(f"hf:{path}: cannot load the model ({e})") from None
        self.model = model.eval()
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if not self.tok.chat_template:
            raise FabrikaError(f"hf:{path}: the tokenizer has no chat template; fine-tune with `fabrika sft` "
                               "(which writes one) or add one to tokenizer_config.json")
        gen = self.model.generation_config.eos_token_id
        ids = gen if isinstance(gen, list) else [gen]
        self.eos_ids = [i for i in dict.fromkeys(ids + [self.tok.eos_token_id]) if i is not None]
        cfg = self.model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.longest_token_bytes = max(len(t.encode("utf-8")) for t in
                                       self.tok.batch_decode([[i] for i in range(len(self.tok))]))
        self.max_batch = max_batch
        self.lock = threading.Lock()  # one generate at a time on one model

    def _template(self, conversation: Messages, tokenize: bool):
        from jinja2 import TemplateError

        try:
            out = self.tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=tokenize,
                                               return_dict=tokenize)
        except TemplateError as e:
            raise ConversationRejected(f"the model's chat template rejects these messages: {e}") from None
        return out["input_ids"] if tokenize else out

    def prompt_ids(self, conversation: Messages) -> list[int]:
        """The ids the model is given for a conversation: its chat template, then the tokenizer."""
        return self._template(conversation, tokenize=True)

    def prompt_tokens(self, conversation: Messages) -> int:
        """Tokens of the templated prompt; refuses what cannot fit the context even without an answer."""
        refuse_oversized(conversation, self.context, self.longest_token_bytes)
        n = len(self.prompt_ids(conversation))
        if n >= self.context:
            raise _too_long(n, 1, self.context)
        return n

    def check_length(self, conversation: Messages, params: GenerationParams) -> int:
        n = self.prompt_tokens(conversation)
        if n + params.max_new_tokens > self.context:
            raise _too_long(n, params.max_new_tokens, self.context)
        return n

    def _kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
                                  pad_token_id=self.tok.pad_token_id, num_return_sequences=self._copies(params))
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kw.update(stop_strings=params.stop, tokenizer=self.tok)
        return kw

    @staticmethod
    def _copies(params: GenerationParams) -> int:
        """Sequences to sample per prompt: greedy answers are all the same, and transformers refuses
        several greedy sequences without beam search, so one is generated and repeated n times."""
        return params.n if params.temperature > 0 else 1

    def generate(self, conversations: list[Messages], params: GenerationParams) -> list[list[Completion]]:
        """Batches of prompts of similar length (sorted, answered, put back in order): less padding."""
        import torch

        prompt_lengths = [self.check_length(c, params) for c in conversations]
        order = sorted(range(len(conversations)), key=prompt_lengths.__getitem__)
        copies = self._copies(params)
        out: list[list[Completion]] = [[] for _ in conversations]
        for start in range(0, len(order), self.max_batch):
            picked = order[start:start + self.max_batch]
            batch = [conversations[i] for i in picked]
            lengths = [prompt_lengths[i] for i in picked]
            texts = [self._template(c, tokenize=False) for c in batch]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with self.lock, torch.no_grad():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                gen = self.model.generate(**enc, **self._kwargs(params))
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, n in enumerate(lengths):
                choices = []
                for j in range(params.n):
                    ids = new[i * copies + j % copies].tolist()
                    ended = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
                    used = ids[:ended] if ended is not None else [t for t in ids if t != self.tok.pad_token_id]
                    text, stopped = _cut_at_stop(self.tok.decode(used, skip_special_tokens=True), params.stop)
                    choices.append(Completion(text, "stop" if ended is not None or stopped else "length", n,
                                              len(used) + (1 if ended is not None else 0)))
                out[picked[i]] = choices
        return out

    def stream(self, conversation: Messages, params: GenerationParams,
               cancel: threading.Event | None = None) -> Steps[str, None, Completion]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        n = self.check_length(conversation, params)
        enc = self.tok([self._template(conversation, tokenize=False)], return_tensors="pt",
                       add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        halt = threading.Event()

        class Halted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop = halt.is_set() or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        kw = self._kwargs(params.model_copy(update={"n": 1}))
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with self.lock, torch.no_grad():
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    outcome["ids"] = self.model.generate(**enc, **kw, streamer=streamer,
                                                         stopping_criteria=StoppingCriteriaList([Halted()]))
            except BaseException as e:  # noqa: BLE001 - handed to the reader, which would wait forever otherwise
                outcome["error"] = e
                streamer.end()

        thread = threading.Thread(target=work, name="fabrika-generate", daemon=True)
        thread.start()
        sent, stopped = "", False
        try:
            for piece in streamer:
                cut, stopped = _cut_at_stop(sent + piece, params.stop)
                if stopped:
                    if len(cut) > len(sent):
                        yield cut[len(sent):]
                    sent = cut
                    break
                if piece:
                    sent += piece
                    yield piece
        finally:  # the reader went away (or a stop string ended the answer): stop generating now
            halt.set()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        ids = outcome["ids"][0, enc["input_ids"].shape[1]:].tolist()
        ended = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        used = len(ids) if ended is None else ended + 1
        finished = ended is not None or stopped or used < params.max_new_tokens
        return Completion(sent, "stop" if finished else "length", n, used)


class GGUFGenerator:
    """llama.cpp; the chat template comes from the GGUF file itself."""

    def __init__(self, path: str, n_ctx: int = 4096, n_threads: int | None = None) -> None:
        from fabrika.infer.llamacpp import load_llama

        if not Path(path).is_file():
            raise FabrikaError(f"gguf:{path}: no such file")
        self.name = Path(path).stem
        try:
            self.llm = load_llama(path, n_ctx=n_ctx, n_threads=n_threads)
        except ValueError as e:  # llama.cpp says only "Failed to load model from file"
            raise FabrikaError(f"gguf:{path}: llama.cpp cannot load this file ({e}); expected a GGUF model, e.g. "
                               "one written by `fabrika export`") from None
        self.context = n_ctx
        self.longest_token_bytes = max(len(self.llm.detokenize([i])) for i in range(self.llm.n_vocab()))
        self.lock = threading.Lock()

    def prompt_tokens(self, conversation: Messages) -> int:
        """About the prompt's tokens (the text's, plus a few a turn for the template)."""
        refuse_oversized(conversation, self.context, self.longest_token_bytes)
        text = "".join(m["content"] for m in conversation)
        n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) + 8 * len(conversation)
        if n >= self.context:
            raise _too_long(n, 1, self.context)
        return n

    def check_length(self, conversation: Messages, params: GenerationParams) -> int:
        n = self.prompt_tokens(conversation)
        if n + params.max_new_tokens > self.context:
            raise _too_long(n, params.max_new_tokens, self.context)
        return n

    def _one(self, conversation: Messages, params: GenerationParams, stream: bool = False):
        kw: dict[str, Any] = dict(messages=conversation, max_tokens=params.max_new_tokens, top_p=params.top_p,
                                  temperature=params.temperature, stop=params.stop or None, stream=stream)
        if params.seed is not None:
            kw["seed"] = params.seed
        return self.llm.create_chat_completion(**kw)

    def generate(self, conversations: list[Messages], params: GenerationParams) -> list[list[Completion]]:
        out = []
        for conv in conversations:
            self.check_length(conv, params)
            choices = []
            for _ in range(params.n):
                with self.lock:
                    r = self._one(conv, params)
                c = r["choices"][0]
                choices.append(Completion(c["message"]["content"] or "", c.get("finish_reason") or "stop",
                                          r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]))
            out.append(choices)
        return out

    def stream(self, conversation: Messages, params: GenerationParams,
               cancel: threading.Event | None = None) -> Steps[str, None, Completion]:
        n = self.check_length(conversation, params)
        text, tokens, finish = "", 0, "stop"
        with self.lock:
            for chunk in self._one(conversation, params, stream=True):  # one chunk a token
                if cancel is not None and cancel.is_set():
                    break
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                piece = choice["delta"].get("content")
                if piece:
                    text, tokens = text + piece, tokens + 1
                    yield piece
        return Completion(text, finish, n, tokens)


class OpenAIGenerator:
    """A remote OpenAI-compatible endpoint through fabrika's client (retries, limits, cache, cost)."""

    def __init__(self, model: str, base_url: str | None = None, **client_options: Any) -> None:
        self.name = model
        self.model = model
        options = {"base_url": base_url} if base_url else {}
        self.config = ClientConfig(**options, **client_options)

    def generate(self, conversations: list[Messages], params: GenerationParams,
                 quiet: bool = True) -> list[list[Completion]]:
        return run_requests(self.config, self.model, conversations, params, quiet=quiet)

    def stream(self, conversation: Messages, params: GenerationParams,
               cancel: threading.Event | None = None) -> Steps[str, None, None]:
        for piece in stream_chat(self.config, self.model, conversation, params):
            if cancel is not None and cancel.is_set():
                break
            yield piece


def load_generator(ref: str, engine: str | None = None, **options: Any) -> Generator:
    """The generator for `ref`; a local Hugging Face model runs on the `engine` chosen (default: the
    FABRIKA_ENGINE setting, else auto)."""
    model = parse_ref(ref)
    if not model.local:
        return OpenAIGenerator(model.model, model.url, **options)
    if model.kind == "gguf":
        return GGUFGenerator(model.path, **options)
    from fabrika.infer.vllm_engine import VLLMGenerator, choose_engine

    if choose_engine(model.kind, model.path, engine) == "vllm":
        return VLLMGenerator(model.path)
    return HFGenerator(model.path, **options)
