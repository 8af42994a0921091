"""``leanlm tokenizer train``: a byte-level BPE tokenizer for a corpus (GPT-2 / Llama-3 style).

Byte-level BPE (Sennrich et al. 2016; Radford et al. 2019): text is mapped to bytes, each byte to
one of 256 printable symbols, and merges are learned greedily by pair frequency until the
vocabulary has ``vocab_size`` entries, so every string is encodable and there is no unknown
token. Pre-tokenization splits with the GPT-2 regex (letters, digits, punctuation, whitespace
runs) so merges never cross word boundaries. The ``tokenizers`` library does the learning (the
same Rust code Hugging Face uses); this module chooses the settings, balances the domains of a
leanlm corpus, prefixes every encoding with the document separator, and writes a Hugging Face
tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json`` with a ChatML chat template)
that ``transformers`` loads as is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from leanlm.data.corpus import load_manifest, read_split
from leanlm.errors import LeanLMError
from leanlm.fsutil import staged_file, write_json

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def corpus_texts(corpus: str | os.PathLike[str], max_bytes_per_domain: int | None) -> Iterator[str]:
    """Training texts of every domain, at most ``max_bytes_per_domain`` from each (balance)."""
    for domain in load_manifest(corpus)["domains"]:
        seen = 0
        for text in read_split(corpus, domain, "train"):
            yield text
            seen += len(text)
            if max_bytes_per_domain is not None and seen >= max_bytes_per_domain:
                break


def add_bos(tok: HFTokenizer) -> None:
    """Prefix encodings with ``<|endoftext|>``: documents are trained as ``<eos> text`` (see
    ``data/tokens.py``), so a prompt starts the way every training document did."""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, tok.token_to_id(EOS))])


def train_tokenizer(corpus: str | os.PathLike[str], out: str | os.PathLike[str],
                    vocab_size: int = 8192, min_frequency: int = 2,
                    max_bytes_per_domain: int | None = 8_000_000, show_progress: bool = True) -> Path:
    """Learn a byte-level BPE on ``corpus`` and save it as an HF tokenizer directory at ``out``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise LeanLMError(f"vocab_size must be > {256 + len(SPECIAL_TOKENS)} (256 byte symbols "
                          f"+ special tokens), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts(corpus, max_bytes_per_domain), trainer)
    add_bos(tok)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with staged_file(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
              "unk_token": None, "pad_token": EOS, "add_bos_token": True,
              "model_max_length": 1 << 20, "chat_template": CHATML}
    write_json(out / "tokenizer_config.json", config)
    return out
