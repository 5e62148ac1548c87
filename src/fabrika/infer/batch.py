"""OpenAI's Batch API for jobs that can wait: the same requests at half the price, answered within 24 hours.

With `client: {mode: batch}`, the requests of a collect stage or of MT-Bench judging go out as JSONL
input files through the files API, one batch per chunk (OpenAI's limits: 50,000 requests and 200 MB),
`completion_window: 24h`; the batches are polled until they end, and each answer reaches the caller
(which journals it row by row) and the response cache exactly as an online answer would.

Never submitting a request twice rests on `batches.jsonl`, an append-only log (fsync'd per record,
appended under a lock) kept beside the response cache, per user like it: a pipeline deletes a stage's
directory when its settings change, and the batches in flight must outlive it. The caller's
directory gets a `batches.jsonl` that only points to that log; each submission names the directory
it was made for (what `fabrika status` and `fabrika batches DIR` show). The records:

1. `submitting` (a fresh tag, the base URL, the custom_ids) is written *before* anything is sent;
2. `uploaded` (the input file's id) once the upload returns;
3. `submitted` (the batch id) the moment `batches.create` returns; the batch carries the tag in its
   `metadata`, and `create` is sent once (the SDK's own retries are off for it);
4. `state` records each change of a batch's status and counts (what `fabrika status` shows);
5. `done` once a finished batch's results have all been handed over and cached.

A rerun (after Ctrl-C or kill -9, with the same or other settings) resumes polling every batch
submitted and not done instead of submitting its requests again; a batch of other requests is
polled too and its answers go to the cache, so none is lost and a run waiting on them finds them
there. A `submitting` record without its batch id (killed between `create` and the write that
follows it, or `create` failed in flight) is resolved first: the batches created since are listed
and matched on the tag in their metadata; one found is adopted, and only when none exists are its
requests submitted again. A request's custom_id is the caller's journal key followed by its response
cache key (a hash of the endpoint, model, messages and sampling settings), so its result maps back
exactly, and a request whose body changed is a new request. Failed and expired requests are sent
again in a new batch or online (`batch.retry`), at most `batch.max_rounds` times in one run; those of
a batch cancelled by `fabrika batches DIR --cancel` are not: the run waiting on it stops with an
error, and the same command run again submits them anew.

Every answer is billed at the batch price (half the online one) in the caller's journal. A batch's
cost is known only once it has ended, so with `budget_usd` the batches are submitted one at a time,
each only while the ones that ended in this run cost less than the budget.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fabrika.artifacts import append_jsonl, read_jsonl
from fabrika.errors import FabrikaError
from fabrika.faults import fault
from fabrika.infer.client import ClientConfig, JobStopped, RequestFailed, ResponseCache, chat_body, completions
from fabrika.infer.costs import api_cost
from fabrika.infer.generation import Completion, GenerationParams, Messages
from fabrika.infer.local import ask_model
from fabrika.models.refs import parse_ref

STATE = "batches.jsonl"
ENDPOINT = "/v1/chat/completions"
FINISHED = {"completed", "failed", "expired", "cancelled"}
TAG = "fabrika_tag"  # the metadata key that finds a batch whose id was never journaled


def custom_id(label: str, key: str) -> str:
    """The caller's journal key (shortened) for people reading the files, then the request's response
    cache key: a hash of the endpoint, the model, the messages and every sampling parameter, so a
    result maps back exactly and a request whose body changed is a new request."""
    return f"{label[:96]}@{key}"


def cache_key(cid: str) -> str:
    return cid.rsplit("@", 1)[-1]


@dataclass
class Submission:
    """One batch as `batches.jsonl` knows it."""

    tag: str
    origin: str  # the caller's batches.jsonl: which stage the batch was submitted for
    base_url: str
    api_key_env: str
    model: str
    custom_ids: list[str]
    time: float
    file_id: str | None = None
    batch_id: str | None = None
    abandoned: bool = False
    status: str = "submitting"
    counts: dict[str, int] = field(default_factory=dict)
    done: bool = False

    @property
    def in_flight(self) -> bool:
        return not self.done and not self.abandoned


def read_state(path: Path) -> dict[str, Submission]:
    """Every submission in `path` by tag, with what later records say about it."""
    subs: dict[str, Submission] = {}
    by_batch: dict[str, Submission] = {}
    for r in read_jsonl(path):
        event = r.get("event")
        if event == "submitting":
            subs[r["tag"]] = Submission(r["tag"], r.get("origin", ""), r["base_url"], r["api_key_env"], r["model"],
                                        r["custom_ids"], r["time"])
            continue
        s = subs.get(r.get("tag", "")) or by_batch.get(r.get("batch_id", ""))
        if s is None:
            continue
        if event == "uploaded":
            s.file_id = r["file_id"]
        elif event == "submitted":
            s.batch_id, s.status = r["batch_id"], "validating"
            by_batch[s.batch_id] = s
        elif event == "abandoned":
            s.abandoned = True
        elif event == "state":
            s.status, s.counts = r["status"], r.get("counts", {})
        elif event == "done":
            s.done, s.status = True, r.get("status", s.status)
    return subs


def _append(path: Path, record: dict[str, Any]) -> None:
    """One record, fsync'd, under an exclusive lock: several runs of one user share the log, and
    append_jsonl's repair of a torn last line must not cut a line another process is writing."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        append_jsonl(path, [{**record, "time": time.time()}])


def _api(base_url: str, api_key_env: str, retries: int = 2, timeout: float = 600.0):
    import openai

    from fabrika.infer.client import _key

    return openai.OpenAI(base_url=base_url, api_key=_key(ClientConfig(base_url=base_url, api_key_env=api_key_env)),
                         max_retries=retries, timeout=timeout)


def _failure(base_url: str, what: str, err: Exception) -> FabrikaError:
    import openai

    if isinstance(err, openai.APIStatusError):
        return FabrikaError(f"{base_url}: {what}: HTTP {err.status_code}: {str(err.message)[:300]}")
    if isinstance(err, openai.APIConnectionError):
        return FabrikaError(f"{base_url}: {what}: cannot connect ({err.__cause__ or err}); is the server running "
                            "and the URL right?")
    raise err


def ask(ref: str, convs: list[Messages], params: GenerationParams, client: dict[str, Any], quiet: bool,
        on_result: Callable[[int, Any], None], *, state: Path, labels: list[str]) -> None:
    """Like local.ask_model (which it calls in online mode): `on_result(i, completions or the failure)`
    for each conversation. `labels[i]` names conversation i in the caller's journal; `state` is where
    the batches are logged."""
    if ClientConfig(**client).mode != "batch":
        ask_model(ref, convs, params, client, quiet, on_result)
        return
    model = parse_ref(ref)
    if model.local:
        raise FabrikaError(f"client.mode: batch needs an API model (openai:MODEL or openai:MODEL@URL); {ref} is "
                           "answered locally: use mode: online")
    config = ClientConfig(**{**client, **({"base_url": model.url} if model.url else {})})
    Batches(config, state, quiet).run(model.model, convs, params, labels, on_result)


class Batches:
    """One call's requests through the Batch API, resumed from and logged to `state`."""

    def __init__(self, config: ClientConfig, state: Path, quiet: bool) -> None:
        self.config, self.quiet = config, quiet
        self.origin = str(Path(state).resolve())
        self.state = Path(config.cache_dir) / STATE if config.cache_dir else Path(state)  # the log itself
        if self.state != Path(state) and not any(r.get("event") == "log" for r in read_jsonl(state)):
            _append(Path(state), {"event": "log", "path": str(self.state.resolve())})
        self.api = _api(config.base_url, config.api_key_env, config.max_retries, config.timeout_s)
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self.spent = 0.0  # at the batch price, by the batches that ended in this run
        self.cancelled_before: set[str] = set()

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def log(self, **record: Any) -> None:
        _append(self.state, record)

    def run(self, model: str, convs: list[Messages], params: GenerationParams, labels: list[str],
            on_result: Callable[[int, Any], None]) -> None:
        lines: dict[str, bytes] = {}  # cache key -> the request's line in an input file
        waiting: dict[str, list[int]] = defaultdict(list)  # cache key -> the conversations it answers
        for i, (label, conv) in enumerate(zip(labels, convs, strict=True)):
            key = ResponseCache.key(self.config.base_url, model, conv, params)
            if key not in lines:
                line = {"custom_id": custom_id(label, key), "method": "POST", "url": ENDPOINT,
                        "body": chat_body(model, conv, params)}
                lines[key] = (json.dumps(line, ensure_ascii=False) + "\n").encode()
            waiting[key].append(i)

        def deliver(key: str, result: Any) -> None:
            for i in waiting.pop(key, []):
                on_result(i, result)

        def cached() -> None:  # answered before, or by a batch another run has harvested
            for key in list(waiting):
                if self.cache and (hit := self.cache.get(key)) is not None:
                    deliver(key, [Completion(**{**c, "cost": 0.0, "cached": True}) for c in hit])

        sent: dict[str, int] = defaultdict(int)  # times this run sent each request
        errors: dict[str, str] = {}
        self._resolve_unconfirmed()
        # batches cancelled while no run was waiting on them: their requests are simply submitted anew
        self.cancelled_before = {s.tag for s in read_state(self.state).values()
                                 if s.in_flight and s.status in ("cancelling", "cancelled")}
        limits = self.config.batch
        while True:
            cached()
            if not waiting:
                break
            open_subs = [s for s in read_state(self.state).values()
                         if s.in_flight and s.base_url == self.config.base_url]
            flying = {cache_key(cid) for s in open_subs for cid in s.custom_ids}
            for key in flying & set(waiting):  # a batch of an earlier run counts as one sending
                sent[key] = max(sent[key], 1)
            retry = [key for key in waiting if key not in flying and sent[key]]
            for key in retry:
                if sent[key] >= limits.max_rounds or limits.retry == "none":
                    deliver(key, RequestFailed(errors.get(key, "failed in its batch")))
            retry = [key for key in retry if key in waiting]
            if retry and limits.retry == "online":
                for key in retry:
                    sent[key] += 1
                self._online(model, retry, convs, params, waiting, deliver)
                continue
            fresh = [key for key in waiting if key not in flying]
            mine = [s for s in open_subs if {cache_key(c) for c in s.custom_ids} & set(waiting)]
            if fresh and (self.config.budget_usd is None or not mine):
                for key in self._submit(model, fresh, lines):
                    sent[key] += 1
                continue
            # others' batches too, once each round: their answers go to the cache, so none is lost
            self._poll(open_subs if self.cache else mine, deliver, errors)
            tags = {s.tag for s in mine}
            if any(s.in_flight for s in read_state(self.state).values() if s.tag in tags):
                time.sleep(limits.poll_s)

    # --- submitting ----------------------------------------------------------------------------

    def _submit(self, model: str, ids: list[str], lines: dict[str, bytes]) -> list[str]:
        """The requests (by cache key) as batches of at most max_requests lines and max_bytes bytes; with
        a budget, only the first batch (the next is submitted once it has ended and its cost is known).
        Returns the requests submitted."""
        chunks: list[list[str]] = [[]]
        size = 0
        limits = self.config.batch
        for key in ids:
            if len(lines[key]) > limits.max_bytes:
                raise FabrikaError(f"batch: one request ({key}) is {len(lines[key]):,} bytes, over the "
                                   f"{limits.max_bytes:,} bytes a batch may hold")
            if chunks[-1] and (len(chunks[-1]) == limits.max_requests or size + len(lines[key]) > limits.max_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(key)
            size += len(lines[key])
        if self.config.budget_usd is not None:
            chunks = chunks[:1]
        for chunk in chunks:
            self._submit_one(model, chunk, lines)
        return [key for chunk in chunks for key in chunk]

    def _submit_one(self, model: str, ids: list[str], lines: dict[str, bytes]) -> None:
        cfg = self.config
        if cfg.budget_usd is not None and self.spent >= cfg.budget_usd:
            raise JobStopped(f"budget of ${cfg.budget_usd:g} spent (batch price)")
        tag = uuid.uuid4().hex
        self.log(event="submitting", tag=tag, origin=self.origin, base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                 model=model, custom_ids=[json.loads(lines[key])["custom_id"] for key in ids])
        try:
            f = self.api.files.create(file=(f"fabrika-{tag}.jsonl", b"".join(lines[c] for c in ids)), purpose="batch")
            self.log(event="uploaded", tag=tag, file_id=f.id)
            batch = self.api.with_options(max_retries=0).batches.create(
                input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h", metadata={TAG: tag})
        except Exception as e:
            raise _failure(cfg.base_url, "submitting a batch", e) from None
        if fault("kill_after_batch_create"):  # test hook: die before the id is journaled
            os.kill(os.getpid(), signal.SIGKILL)
        self.log(event="submitted", tag=tag, batch_id=batch.id)
        self.say(f"batch {batch.id}: submitted {len(ids)} requests to {model}")

    def _resolve_unconfirmed(self) -> None:
        """Adopt the batch of each `submitting` record that never got its id written, found by the tag
        in its metadata; give up those that have none (their requests were never submitted)."""
        unsure = [s for s in read_state(self.state).values()
                  if s.in_flight and s.batch_id is None and s.base_url == self.config.base_url]
        if not unsure:
            return
        since = min(s.time for s in unsure) - 300  # clocks differ; the listing is newest first
        found: dict[str, str] = {}
        try:
            for b in self.api.batches.list(limit=100):
                if (b.metadata or {}).get(TAG):
                    found[b.metadata[TAG]] = b.id
                if b.created_at < since:
                    break
        except Exception as e:
            raise _failure(self.config.base_url, "listing batches", e) from None
        for s in unsure:
            if s.tag in found:
                self.log(event="submitted", tag=s.tag, batch_id=found[s.tag])
                self.say(f"batch {found[s.tag]}: found again by its tag; polling it, not submitting again")
            else:
                self.log(event="abandoned", tag=s.tag)

    # --- polling and results -------------------------------------------------------------------

    def _poll(self, subs: list[Submission], deliver, errors: dict[str, str]) -> None:
        for s in subs:
            if s.batch_id is None:
                continue
            try:
                b = self.api.batches.retrieve(s.batch_id)
            except Exception as e:
                raise _failure(self.config.base_url, f"reading batch {s.batch_id}", e) from None
            counts = b.request_counts.model_dump() if b.request_counts else {}
            if (b.status, counts) != (s.status, s.counts):
                self.log(event="state", batch_id=s.batch_id, status=b.status, counts=counts)
                self.say(f"batch {s.batch_id}: {b.status}, {counts.get('completed', 0)} of "
                         f"{counts.get('total', len(s.custom_ids))} done, {counts.get('failed', 0)} failed")
            if b.status in FINISHED:
                self._harvest(s, b, deliver, errors)

    def _rows(self, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        try:
            text = self.api.files.content(file_id).text
        except Exception as e:
            raise _failure(self.config.base_url, f"downloading {file_id}", e) from None
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _harvest(self, s: Submission, b: Any, deliver, errors: dict[str, str]) -> None:
        """Hand over (and cache) every answer of a finished batch; note why the others failed."""
        from openai.types.chat import ChatCompletion

        answered: set[str] = set()
        cost = 0.0
        for row in self._rows(b.output_file_id) + self._rows(b.error_file_id):
            key, response = cache_key(str(row.get("custom_id"))), row.get("response") or {}
            if response.get("status_code") == 200:
                r = ChatCompletion.model_validate(response["body"])
                usage = r.usage
                c = api_cost(s.model, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                             prices=self.config.prices, mode="batch").usd
                result = completions(r, c)
                cost += c
                answered.add(key)
                if self.cache:
                    self.cache.put(key, [x.__dict__ for x in result])
                deliver(key, result)
            else:
                err = row.get("error") or (response.get("body") or {}).get("error") or {}
                errors[key] = f"batch {s.batch_id}: {err.get('code') or response.get('status_code')}: " \
                              f"{err.get('message', '')}"[:300]
        reason = "; ".join(e.message or e.code or "" for e in (b.errors.data or [])) if b.errors else ""
        for key in {cache_key(c) for c in s.custom_ids} - answered:
            errors.setdefault(key, f"batch {s.batch_id} {b.status}" + (f": {reason}" if reason else ""))
            if b.status == "cancelled" and s.tag not in self.cancelled_before:
                deliver(key, RequestFailed(f"batch {s.batch_id} was cancelled"))
        self.spent += cost
        self.log(event="done", batch_id=s.batch_id, status=b.status, answered=len(answered),
                 failed=len(s.custom_ids) - len(answered), cost_usd=round(cost, 6))
        if reason:
            self.say(f"batch {s.batch_id}: {b.status}: {reason}")

    def _online(self, model: str, keys: list[str], convs: list[Messages], params: GenerationParams,
                waiting: dict[str, list[int]], deliver) -> None:
        from fabrika.infer.client import run_requests

        self.say(f"batch: {len(keys)} failed requests sent again online")
        online = self.config.model_copy(update={"mode": "online"})
        run_requests(online, model, [convs[waiting[key][0]] for key in keys], params, quiet=self.quiet,
                     on_result=lambda i, result: deliver(keys[i], result))


# --- what `fabrika status` and `fabrika batches` show ---------------------------------------------

def submissions(root: Path) -> list[tuple[Path, Submission]]:
    """Every batch submitted for the stages under `root` (a stage or run directory), with the log
    that holds it."""
    root = Path(root)
    out = []
    for local in [root / STATE] if (root / STATE).is_file() else sorted(root.rglob(STATE)):
        logs = {local} | {Path(r["path"]) for r in read_jsonl(local) if r.get("event") == "log"}
        origin = str(local.resolve())
        out += [(log, s) for log in sorted(logs) for s in read_state(log).values()
                if s.origin == origin and (s.batch_id or s.in_flight)]
    return out


def in_flight_line(root: Path) -> str:
    """'2 batches in flight (in_progress 40/100)' or '' when none: for the status table."""
    flying = [s for _, s in submissions(root) if s.in_flight] if Path(root).is_dir() else []
    if not flying:
        return ""
    states = ", ".join(f"{s.status} {s.counts.get('completed', 0)}/{s.counts.get('total', len(s.custom_ids))}"
                       for s in flying[:3])
    return f"{len(flying)} batch{'es' if len(flying) > 1 else ''} in flight ({states})"


def cancel(root: Path) -> list[str]:
    """Ask the server to cancel every batch in flight under `root`; the ids of those cancelled."""
    out = []
    for path, s in submissions(root):
        if not s.in_flight or s.batch_id is None or s.status == "cancelling":
            continue
        api = _api(s.base_url, s.api_key_env)
        try:
            b = api.batches.cancel(s.batch_id)
        except Exception as e:
            raise _failure(s.base_url, f"cancelling batch {s.batch_id}", e) from None
        _append(path, {"event": "state", "batch_id": s.batch_id, "status": b.status,
                       "counts": b.request_counts.model_dump() if b.request_counts else s.counts})
        out.append(s.batch_id)
    return out
