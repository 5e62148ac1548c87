"""The response cache knows an answer by everything that changes it: the endpoint (or a local
model's content), the model, the messages and every sampling parameter."""

from __future__ import annotations

import os
import shutil

from fabrika.infer.generation import GenerationParams
from fabrika.infer.client import ResponseCache

HELLO = [{"role": "user", "content": "Привет, “world”"}]


def test_key_covers_endpoint_model_and_every_sampling_parameter():
    base = ResponseCache.key("http://a/v1", "m", HELLO, GenerationParams())
    assert base == ResponseCache.key("http://a/v1", "m", HELLO, GenerationParams())
    others = [ResponseCache.key("http://b/v1", "m", HELLO, GenerationParams()),
              ResponseCache.key("http://a/v1", "m2", HELLO, GenerationParams())]
    for field, value in [("temperature", 0.7), ("top_p", 0.9), ("max_new_tokens", 7), ("seed", 1), ("stop", ["x"]),
                         ("n", 2)]:
        others.append(ResponseCache.key("http://a/v1", "m", HELLO, GenerationParams(**{field: value})))
    assert len({base, *others}) == len(others) + 1


def test_a_local_model_is_known_by_its_content(tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"layers": 2}')
    (model / "model.safetensors").write_bytes(b"\x00" * 1000)
    first = cache.content_id(model)
    assert cache.content_id(model) == first
    shutil.copytree(model, tmp_path / "copy")
    assert cache.content_id(tmp_path / "copy") == first  # same bytes elsewhere: same answers
    weights = model / "model.safetensors"
    weights.write_bytes(b"\x01" * 1000)  # retrained in place, later (same size)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert cache.content_id(model) != first
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 100)
    assert cache.content_id(gguf).startswith("sha256:") and cache.content_id(gguf) != first
