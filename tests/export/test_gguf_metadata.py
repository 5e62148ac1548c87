"""What a GGUF file tells whoever receives it: the lineage of the model, without the exporting
machine's paths (they name users and hosts)."""

from __future__ import annotations

import json

from fabrika.export import gguf as writer


def _string(reader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_metadata_names_the_model_without_local_paths(tmp_path, tiny_tokenizer):
    import gguf
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "home" / "alice" / "runs" / "sft" / "model"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=64)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    lineage = {"source": str(model_dir), "stage": "sft", "fingerprint": "abc",
               "inputs": {"collect": {"path": f"hf:{tmp_path}/home/alice/runs/collect/dataset", "fingerprint": "d"},
                          "base": {"path": "Qwen/Qwen2-0.5B", "fingerprint": "e"}}}
    out = tmp_path / "m.gguf"
    writer.convert(model_dir, out, "f16", lineage=lineage)

    reader = gguf.GGUFReader(str(out))
    assert _string(reader, "fabrika.source") == "model"
    stored = json.loads(_string(reader, "fabrika.lineage"))
    assert stored["source"] == "model" and stored["fingerprint"] == "abc"
    assert stored["inputs"]["collect"]["path"] == "hf:dataset"
    assert stored["inputs"]["base"]["path"] == "Qwen/Qwen2-0.5B"  # a Hub id is not a local path
    assert str(tmp_path) not in out.read_bytes().decode("latin-1")
