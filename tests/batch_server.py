"""A batch-capable OpenAI-compatible server on 127.0.0.1 for tests: the files API (multipart upload,
content download) and the batches API (create, retrieve, list, cancel), with a lifecycle the test
controls, and chat completions for requests sent again online.

Each batch is `validating` when created, `in_progress` at its first retrieve, and ends at its
`polls`-th retrieve with the next of `fates`: "complete" (answers in the output file; requests the
test's `error_if` picks get HTTP 500 rows in the error file), "expire" (the first half answered, the
rest `batch_expired` rows in the error file) or "fail" (validation failed: no output at all). A
cancelled batch is `cancelling`, then `cancelled` at the next retrieve with nothing answered. The
first `lose_creates` batches are created but answered with HTTP 500, as when a reply is lost.

`log` receives every call ({"op": "create", "batch_id", "custom_ids"}, "upload", "retrieve", "list",
"cancel", "chat"): the witness of what was submitted.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from email.parser import BytesParser
from typing import Callable, Iterator

from fastapi import Request  # at module level: the routes' annotations are resolved here

from helpers import serving


@contextmanager
def batch_server(reply: Callable[[list[dict]], str], log: list[dict], fates: list[str] | None = None, polls: int = 3,
                 error_if: Callable[[list[dict]], bool] = lambda messages: False,
                 lose_creates: int = 0) -> Iterator[str]:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()
    files: dict[str, bytes] = {}
    batches: dict[str, dict] = {}
    seen: dict[str, int] = {}
    fates = list(fates or [])
    lost = [0]
    lock = threading.Lock()

    def new_file(data: bytes, purpose: str, name: str) -> dict:
        fid = f"file-{len(files) + 1}"
        files[fid] = data
        return {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()), "filename": name,
                "purpose": purpose, "status": "processed"}

    def answer(body: dict) -> dict:
        """`n` choices: the rule's answer, then variants of it."""
        text = reply(body["messages"])
        choices = [{"index": j, "message": {"role": "assistant", "content": text + (f" (variant {j})" if j else "")},
                    "finish_reason": "stop"} for j in range(body.get("n", 1))]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}

    def finish(b: dict, fate: str) -> None:
        requests = [json.loads(line) for line in files[b["input_file_id"]].decode().splitlines() if line.strip()]
        now = int(time.time())
        if fate == "fail":
            b.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "invalid_model", "message": "the model does not exist", "line": 1}]})
            return
        cut = len(requests) // 2 if fate == "expire" else len(requests)
        out, err = [], []
        for n, r in enumerate(requests):
            if n >= cut:
                err.append({"id": f"r{n}", "custom_id": r["custom_id"], "response": None,
                            "error": {"code": "batch_expired", "message": "not executed before the window ended"}})
            elif error_if(r["body"]["messages"]):
                err.append({"id": f"r{n}", "custom_id": r["custom_id"], "error": None, "response": {
                    "status_code": 500, "request_id": f"q{n}",
                    "body": {"error": {"message": "the server had an error", "type": "server_error"}}}})
            else:
                out.append({"id": f"r{n}", "custom_id": r["custom_id"], "error": None,
                            "response": {"status_code": 200, "request_id": f"q{n}", "body": answer(r["body"])}})
        dump = lambda rows: "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows).encode()  # noqa: E731
        b["output_file_id"] = new_file(dump(out), "batch_output", "out.jsonl")["id"] if out else None
        b["error_file_id"] = new_file(dump(err), "batch_output", "err.jsonl")["id"] if err else None
        b["request_counts"] = {"total": len(requests), "completed": len(out), "failed": len(err)}
        b.update(status="expired" if fate == "expire" else "completed",
                 **{("expired_at" if fate == "expire" else "completed_at"): now})

    @app.post("/v1/files")
    async def upload(request: Request):
        raw = await request.body()
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        parts = {p.get_param("name", header="content-disposition"): p
                 for p in BytesParser().parsebytes(head + raw).get_payload()}
        data = parts["file"].get_payload(decode=True)
        with lock:
            log.append({"op": "upload", "bytes": len(data)})
            return new_file(data, parts["purpose"].get_payload(decode=True).decode(), parts["file"].get_filename())

    @app.get("/v1/files/{fid}/content")
    async def content(fid: str):
        if fid not in files:
            return JSONResponse({"error": {"message": f"no file {fid}"}}, status_code=404)
        return Response(files[fid], media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create(body: dict):
        with lock:
            if body.get("input_file_id") not in files:
                return JSONResponse({"error": {"message": "no such input file"}}, status_code=400)
            bid = f"batch_{len(batches) + 1}"
            lines = files[body["input_file_id"]].decode().splitlines()
            b = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                 "completion_window": body["completion_window"], "status": "validating",
                 "created_at": int(time.time()), "metadata": body.get("metadata"),
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                 "output_file_id": None, "error_file_id": None, "errors": None}
            batches[bid] = b
            seen[bid] = 0
            log.append({"op": "create", "batch_id": bid, "custom_ids": [json.loads(x)["custom_id"] for x in lines]})
            if lost[0] < lose_creates:  # created, but the answer never reaches the client
                lost[0] += 1
                return JSONResponse({"error": {"message": "upstream timed out", "type": "server_error"}},
                                    status_code=500)
            return b

    @app.get("/v1/batches/{bid}")
    async def retrieve(bid: str):
        with lock:
            b = batches.get(bid)
            if b is None:
                return JSONResponse({"error": {"message": f"no batch {bid}"}}, status_code=404)
            log.append({"op": "retrieve", "batch_id": bid})
            seen[bid] += 1
            if b["status"] == "cancelling":
                b.update(status="cancelled", cancelled_at=int(time.time()))
            elif b["status"] in ("validating", "in_progress"):
                b["status"] = "in_progress"
                if seen[bid] >= polls:
                    finish(b, fates.pop(0) if fates else "complete")
            return b

    @app.get("/v1/batches")
    async def listing(limit: int = 20, after: str | None = None):
        with lock:
            log.append({"op": "list"})
            newest = sorted(batches.values(), key=lambda b: int(b["id"].split("_")[1]), reverse=True)
            if after:
                newest = newest[[b["id"] for b in newest].index(after) + 1:]
            page = newest[:limit]
            return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": len(newest) > limit}

    @app.post("/v1/batches/{bid}/cancel")
    async def cancel(bid: str):
        with lock:
            b = batches[bid]
            log.append({"op": "cancel", "batch_id": bid})
            if b["status"] in ("validating", "in_progress"):
                b.update(status="cancelling", cancelling_at=int(time.time()))
            return b

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        log.append({"op": "chat", "messages": body["messages"]})
        return answer(body)

    with serving(app) as url:
        yield url


def submitted(log: list[dict]) -> list[str]:
    """Every custom_id the server was asked to run, once per submission."""
    return [cid for e in log if e["op"] == "create" for cid in e["custom_ids"]]
