"""The transformers engine: prompts batched by length and answered in their own order, and several
greedy answers asked for at once (which transformers itself refuses without beam search)."""

from fabrika.infer.backends import load_generator
from fabrika.infer.generation import GenerationParams

PROMPTS = [[{"role": "user", "content": "word " * n}] for n in (40, 2, 25, 1, 60)]


def test_length_sorted_batches_keep_the_callers_order_and_greedy_n(chat_model):
    gen = load_generator(f"hf:{chat_model}", engine="transformers", max_batch=2)
    params = GenerationParams(max_new_tokens=6)
    batched = [c[0].text for c in gen.generate(PROMPTS, params)]
    alone = [gen.generate([p], params)[0][0].text for p in PROMPTS]
    assert batched == alone
    three = gen.generate(PROMPTS[:2], params.model_copy(update={"n": 3}))
    assert [[c.text for c in choices] for choices in three] == [[a] * 3 for a in alone[:2]]
    sampled = gen.generate(PROMPTS[:1], GenerationParams(max_new_tokens=6, temperature=1.0, n=3, seed=1))
    assert len(sampled[0]) == 3
