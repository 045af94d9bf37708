"""Tokenizer of a checkpoint directory (``tokenizer.json``, read by the
``tokenizers`` library) with its end-of-sequence ids, and streaming decode."""

import json
from pathlib import Path


class Tokenizer:
    def __init__(self, model_dir: Path, config: dict):
        try:
            from tokenizers import Tokenizer as FastTokenizer
        except ImportError as e:
            raise ImportError("[mlx_ext.gpt] reading tokenizer.json needs the 'tokenizers' package") from e
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"[mlx_ext.gpt] {path} not found: only tokenizer.json tokenizers are supported"
            )
        self._tokenizer = FastTokenizer.from_file(str(path))
        self.eos_token_ids = self._eos_ids(Path(model_dir), config)

    def _eos_ids(self, model_dir: Path, config: dict) -> set[int]:
        """From config.json, generation_config.json and tokenizer_config.json's eos_token."""
        ids = set()
        sources = [config]
        if (model_dir / "generation_config.json").exists():
            sources.append(json.loads((model_dir / "generation_config.json").read_text()))
        for source in sources:
            eos = source.get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if (model_dir / "tokenizer_config.json").exists():
            eos = json.loads((model_dir / "tokenizer_config.json").read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos is not None and self._tokenizer.token_to_id(eos) is not None:
                ids.add(self._tokenizer.token_to_id(eos))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids, with the special tokens (BOS, ...) the tokenizer adds."""
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Turns tokens, one at a time, into the text they add. The whole sequence
    is decoded each time (tokenizers drop or merge spaces and bytes at the
    edges of a partial decode), and text ending in an incomplete UTF-8
    character is held back until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._text = ""

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = self._tokenizer.decode(self._tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self._text = text[len(self._text):], text
        return new
