"""A conversation with a chat model whose key/value cache is kept across turns.

Each turn renders the whole conversation with the chat template, and only the
text after what the cache already holds (the previous prompts and replies) is
tokenized and run: the earlier turns are never recomputed.
"""

from typing import Callable

from .cache import KVCache
from .generation import Generation, generate
from .model import Model
from .sampling import Sampler
from .tokenizer import Tokenizer


class ChatSession:
    def __init__(self, model: Model, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict] = []
        self.cache: KVCache = model.make_cache()
        self._cached_ids: list[int] = []  # the tokens the cache holds, in order

    def ask(
        self,
        text: str,
        *,
        max_tokens: int = 256,
        sampler: Sampler | None = None,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """The assistant's reply to the user's `text`, which stops at the end-of-turn token."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._new_prompt_ids()
        before = self.cache.offset
        reply = generate(
            self.model, self.tokenizer, prompt, max_tokens=max_tokens, sampler=sampler, seed=seed,
            on_text=on_text, cache=self.cache,
        )
        # The cache holds the prompt and the reply's tokens, the end-of-turn
        # token too when it was run (every token but the last one sampled is).
        run = self.cache.offset - before - len(prompt)
        sampled = reply.tokens + ([] if reply.end_token is None else [reply.end_token])
        self._cached_ids += prompt + sampled[:run]
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply

    def _new_prompt_ids(self) -> list[int]:
        """The tokens of the rendered conversation after those the cache holds;
        all of it, on a fresh cache, where the rendering does not continue the
        cached text (a template that rewrites earlier turns)."""
        rendered = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        cached = self.tokenizer.decode(self._cached_ids, skip_special_tokens=False)
        if not rendered.startswith(cached):
            self.cache, self._cached_ids, cached = self.model.make_cache(), [], ""
        return self.tokenizer.encode(rendered[len(cached):], add_special_tokens=False)
