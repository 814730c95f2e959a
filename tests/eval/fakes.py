"""A character-level stand-in for EvalLM, to test harness logic without a model.

``answer_fn(prompt_text) -> str`` decides the "generation"; token ids are code points.
"""


class CharLM:
    max_length = 100_000

    def __init__(self, answer_fn, bos_id=1):
        self.answer_fn = answer_fn
        self.bos_id = bos_id
        self.calls = []

    def encode(self, text, bos=None):
        return [self.bos_id] + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != self.bos_id)

    def generate(self, prompts, max_new_tokens, batch_size=1, stop_strings=(), progress=False, desc=""):
        from eval.lm import cut_at_stop

        self.calls.append((len(prompts), max_new_tokens))
        return [cut_at_stop(self.answer_fn(self.decode(p))[:max_new_tokens], stop_strings) for p in prompts]
