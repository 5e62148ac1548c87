"""Opening a GGUF file with llama.cpp (llama-cpp-python), the one place that does it.

The defaults are what serving, chat and perplexity want: every physical core (hyper-threads add
little to llama.cpp's matmuls), llama.cpp's own KV cache type (f16, what any llama.cpp user gets), and
logits for the last token only. A caller that needs other settings names them; export verification
does (see `fabrika.export.verify.open_for_comparison`).
"""

from __future__ import annotations

import os
from pathlib import Path

from fabrika.errors import FabrikaError

# ggml's type id for float32 (GGML_TYPE_F32), as llama.cpp takes it for the KV cache's type_k/type_v
F32_KV_CACHE = 0


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def load_llama(path: str | Path, n_ctx: int, *, n_threads: int | None = None, kv_cache_type: int | None = None,
               logits_all: bool = False):
    """A `llama_cpp.Llama` on `path` with a context of `n_ctx` tokens. `n_threads` defaults to the
    physical cores, `kv_cache_type` (a ggml type id such as `F32_KV_CACHE`) to llama.cpp's default, and
    `logits_all` (keep every position's logits, as perplexity and comparisons read them) to off."""
    try:
        import llama_cpp
    except ImportError:
        raise FabrikaError("GGUF files need llama-cpp-python: pip install 'fabrika[llama]'") from None
    threads = n_threads or physical_cores()
    cache = {} if kv_cache_type is None else {"type_k": kv_cache_type, "type_v": kv_cache_type}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                           n_threads=threads, n_threads_batch=threads, **cache)
