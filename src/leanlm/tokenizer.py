"""Hugging Face tokenizers: ``tokenizer.json`` + ``tokenizer_config.json`` + chat templates.

Tokenization itself is the ``tokenizers`` library (the same Rust code ``transformers`` uses).
This module adds what a checkpoint directory specifies around it:

* special tokens (``bos_token``, ``eos_token``, ``add_bos_token``) from ``tokenizer_config.json``;
* the chat template (``chat_template`` in ``tokenizer_config.json`` or ``chat_template.jinja``),
  rendered in a sandboxed jinja2 environment configured as ``transformers`` configures it
  (trim_blocks, lstrip_blocks, loop controls, a non-escaping ``tojson``, ``raise_exception``,
  ``strftime_now``) so prompts are byte-identical;
* :class:`IncrementalDecoder` for streaming: decoding token by token must not emit half of a
  multi-byte UTF-8 character, nor lose the leading-space handling of SentencePiece-style
  decoders. It keeps a small window of already-emitted tokens as left context (the
  prefix/read-offset scheme of vLLM and TGI) and holds text back while it ends in U+FFFD.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from leanlm.errors import LeanLMError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
        return value.get("content")
    return value


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the checkpoint's special tokens and chat template."""

    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, source: Path | None = None) -> None:
        self.tok = tok
        self.config = config or {}
        self.chat_template = chat_template
        self.source = source
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.add_bos_token = bool(self.config.get("add_bos_token", False))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, release_gil: bool = False) -> list[int]:
        """Token ids of ``text``. ``release_gil``: through ``encode_batch``, which releases the GIL
        while it works (``encode`` holds it), so other threads — a server's event loop — run
        meanwhile; a server calls it from a worker thread."""
        if release_gil:
            ids = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the checkpoint's chat template (as transformers does)."""
        if not self.chat_template:
            raise LeanLMError(f"{self.source or 'tokenizer'}: no chat template (expected "
                              "'chat_template' in tokenizer_config.json or a chat_template.jinja)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise LeanLMError(f"chat message {i} must be a dict with 'role' and 'content'")
        special = {k: _token_str(v) for k, v in self.config.items()
                   if k.endswith("_token") and not k.startswith("add_")}  # bos_token, eos_token …
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the special tokens itself, so none are added on top.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.source is not None:
            for name in TOKENIZER_FILES:
                if (self.source / name).is_file():
                    shutil.copyfile(self.source / name, path / name)
            return
        self.tok.save(str(path / "tokenizer.json"))
        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, chat template) from a model dir."""
    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise LeanLMError(f"{path}: no tokenizer.json (leanlm reads Hugging Face fast tokenizers)")
    try:
        tok = HFTokenizer.from_file(str(tj))
    except Exception as e:  # the Rust side raises a bare Exception
        raise LeanLMError(f"{tj}: not a valid tokenizer.json ({e})") from None
    config: dict[str, Any] = {}
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        try:
            config = json.loads(tc.read_text())
        except json.JSONDecodeError as e:
            raise LeanLMError(f"{tc}: not valid JSON ({e.msg} at line {e.lineno})") from None
    template = config.pop("chat_template", None)
    if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return Tokenizer(tok, config, template, path)


_TEMPLATES: dict[str, Any] = {}


def _compile(template: str) -> Any:
    if template not in _TEMPLATES:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise LeanLMError(f"chat template: {message}")

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _TEMPLATES[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise LeanLMError(f"chat template does not parse: {e.message} (line {e.lineno})") from None
    return _TEMPLATES[template]


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text deltas that concatenate to decode(ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = decode(self.ids[self.prefix_offset:], self.skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
