from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama with the ChatML tokenizer; generation stops at <|im_end|>."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("chat_model")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                         max_position_embeddings=256))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(eos_token_id=[im_end, tok.eos_token_id], pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def server(chat_model):
    from fabrika.infer.serve import serve_in_background

    with serve_in_background(f"hf:{chat_model}", name="tiny") as handle:
        yield handle
