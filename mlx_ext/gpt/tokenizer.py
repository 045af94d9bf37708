"""The tokenizer of a model: a Hugging Face ``tokenizers`` tokenizer (read
from a checkpoint's ``tokenizer.json``, or built from a GGUF's vocabulary by
gguf.py), its end-of-sequence ids, its chat template and streaming decode."""

import json
from pathlib import Path


def _fast_tokenizer_class():
    try:
        from tokenizers import Tokenizer as FastTokenizer
    except ImportError as e:
        raise ImportError(
            "[mlx_ext.gpt] the tokenizer needs the 'tokenizers' package (pip install 'mlx_ext[models]')"
        ) from e
    return FastTokenizer


class Tokenizer:
    def __init__(
        self,
        fast_tokenizer,
        eos_token_ids: set[int],
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self._tokenizer = fast_tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_directory(cls, model_dir: Path, config: dict) -> "Tokenizer":
        """From a checkpoint's tokenizer.json, with the end-of-sequence ids of
        config.json, generation_config.json and tokenizer_config.json."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"[mlx_ext.gpt] {path} not found: only tokenizer.json tokenizers are supported"
            )
        fast = _fast_tokenizer_class().from_file(str(path))
        tokenizer_config = {}
        if (model_dir / "tokenizer_config.json").exists():
            tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
        ids = set()
        sources = [config]
        if (model_dir / "generation_config.json").exists():
            sources.append(json.loads((model_dir / "generation_config.json").read_text()))
        for source in sources:
            eos = source.get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])

        def token_text(key):
            token = tokenizer_config.get(key)
            return token.get("content") if isinstance(token, dict) else token

        eos_token = token_text("eos_token")
        if eos_token is not None and fast.token_to_id(eos_token) is not None:
            ids.add(fast.token_to_id(eos_token))
        return cls(
            fast,
            ids,
            chat_template=tokenizer_config.get("chat_template"),
            bos_token=token_text("bos_token"),
            eos_token=eos_token,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, with the special tokens (BOS, ...) the tokenizer adds
        unless `add_special_tokens` is False."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        """The conversation rendered by the model's chat template (jinja2, in
        the sandbox Hugging Face uses), as token ids or, with tokenize=False,
        text; Hugging Face's signature and defaults (add_generation_prompt=True
        opens the assistant's turn)."""
        if self.chat_template is None:
            raise ValueError("[mlx_ext.gpt] this model has no chat template")
        text = _compiled_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        # The template writes the special tokens (BOS, ...) itself.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def stream(self) -> "TextStream":
        return TextStream(self)

    def save(self, folder: Path) -> None:
        """tokenizer.json and tokenizer_config.json, as Hugging Face's
        PreTrainedTokenizerFast (what mlx-lm loads) reads them."""
        folder = Path(folder)
        self._tokenizer.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
        }
        (folder / "tokenizer_config.json").write_text(
            json.dumps({k: v for k, v in config.items() if v is not None}, indent=2)
        )


def _compiled_template(source: str):
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError(
            "[mlx_ext.gpt] chat templates need the 'jinja2' package (pip install 'mlx_ext[models]')"
        ) from e

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


class TextStream:
    """Turns tokens, one at a time, into the text they add, in time linear in
    the length. Tokenizers drop or merge spaces and bytes at the edges of a
    partial decode, so each token's text is the decode of a short window (from
    the last emitted token on) minus the decode of the window without it; text
    ending in an incomplete UTF-8 character is held back until the next token
    completes it."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # window start: the token before the text not yet emitted
        self._read = 0  # tokens[:read] have been emitted

    def add(self, token: int) -> str:
        self._tokens.append(token)
        emitted = self._tokenizer.decode(self._tokens[self._prefix : self._read])
        text = self._tokenizer.decode(self._tokens[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return text[len(emitted):]
