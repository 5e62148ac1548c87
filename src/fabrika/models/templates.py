"""Chat templates, each with the end-of-turn token a model must learn to emit and stop at.

The template is written into the saved tokenizer (`chat_template`) and its end-of-turn token into
`generation_config.eos_token_id`, so chat, serve and GGUF export format prompts exactly as training
did and stop where the model learned to stop. Assistant content is wrapped in `{% generation %}`
markers, which is how transformers and TRL find the tokens to compute the loss on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Template:
    jinja: str
    end_of_turn: str | None  # None: the tokenizer's own eos token
    special_tokens: tuple[str, ...]  # tokens the template needs in the vocabulary


CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral's [INST] format has no system role: a system message is prepended to the first user turn.
MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)

TemplateName = Literal["chatml", "llama3", "mistral"]  # what a config may name; TEMPLATES holds each
TEMPLATES: dict[TemplateName, Template] = {
    "chatml": Template(CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": Template(LLAMA3, "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": Template(MISTRAL, None, ()),
}

