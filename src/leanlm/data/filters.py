"""Heuristic quality filters: Gopher quality and repetition rules, C4 line rules, length/symbols.

Rules and default thresholds follow the papers and datatrove's implementations:

- :class:`GopherQuality` (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
  from Training Gopher", App. A.1.1): 50–100k words; mean word length 3–10 characters; symbol
  (``#``, ``...``, ``…``) to word ratio ≤ 0.1; ≤ 90% of lines starting with a bullet; ≤ 30% of
  lines ending with an ellipsis; ≥ 80% of words containing a letter; ≥ 2 of the stop words
  {the, be, to, of, and, that, have, with}.
- :class:`GopherRepetition` (same appendix, Table A1): fraction of duplicate lines ≤ 0.3 and of
  characters in them ≤ 0.2 (same for paragraphs); the most frequent 2/3/4-gram covers ≤ 20/18/16%
  of the characters; characters inside duplicated 5…10-grams ≤ 15, 14, 13, 12, 11, 10%.
- :class:`C4Lines` (Raffel et al. 2020, §2.2): drop lines that do not end in terminal punctuation,
  have fewer than 3 words, or mention javascript / cookie policies; drop the document if it has
  ``{`` (code) or "lorem ipsum", or fewer than 5 sentences left. It rewrites the text.
- :class:`LengthFilter` and :class:`SymbolFilter`: character bounds and the ratio of characters
  that are neither letters, digits nor whitespace.

Each removal is attributed to its rule (``gopher_quality:min_words`` …) in the pipeline's stats.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from leanlm.data.pipeline import Context, Doc, Filter, Stage, StageStats

WORD = re.compile(r"\w+|[^\w\s]+")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "※", "·", "-", "*", "–", "—")
TERMINAL = (".", "!", "?", '"', "'", "”", "’")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
          "use cookies")


def words(text: str) -> list[str]:
    """The words of ``text`` (punctuation runs, which the tokenizer also returns, left out)."""
    return [w for w in WORD.findall(text) if any(c.isalnum() for c in w)]


@dataclass
class GopherQuality(Filter):
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    name = "gopher_quality"

    def reason(self, text: str) -> str | None:
        ws = words(text)
        n = len(ws)
        if n < self.min_words:
            return f"{self.name}:min_words"
        if n > self.max_words:
            return f"{self.name}:max_words"
        avg = sum(map(len, ws)) / n
        if avg < self.min_avg_word_length:
            return f"{self.name}:min_avg_word_length"
        if avg > self.max_avg_word_length:
            return f"{self.name}:max_avg_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > self.max_symbol_word_ratio:
            return f"{self.name}:symbol_word_ratio"
        lines = [ln for ln in text.splitlines() if ln.strip()] or [""]
        if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > self.max_bullet_lines_ratio:
            return f"{self.name}:bullet_lines_ratio"
        ellipsis = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
        if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
            return f"{self.name}:ellipsis_lines_ratio"
        if sum(any(c.isalpha() for c in w) for w in ws) / n < self.min_alpha_words_ratio:
            return f"{self.name}:alpha_words_ratio"
        if sum(w.lower() in STOP_WORDS for w in ws) < self.min_stop_words:
            return f"{self.name}:stop_words"
        return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in them)."""
    seen: set[str] = set()
    count = chars = 0
    for it in items:
        if it in seen:
            count += 1
            chars += len(it)
        else:
            seen.add(it)
    return count, chars


def top_ngram_char_fraction(ws: list[str], n: int, total: int) -> float:
    """Characters covered by the most frequent word n-gram (counted per occurrence) / total."""
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return sum(map(len, gram)) * count / total if count > 1 else 0.0


def dup_ngram_char_fraction(ws: list[str], n: int, total: int) -> float:
    """Characters of words inside an n-gram seen earlier (overlaps counted once) / total."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(ws)
    i = 0
    while i <= len(ws) - n:
        gram = tuple(ws[i:i + n])
        if gram in seen:
            for j in range(i, i + n):
                covered[j] = True
            i += n  # datatrove: skip past a duplicate so its words are not counted twice
        else:
            seen.add(gram)
            i += 1
    return sum(len(w) for w, c in zip(ws, covered, strict=True) if c) / total


@dataclass
class GopherRepetition(Filter):
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_ngrams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                                 (9, 0.11), (10, 0.10))
    name = "gopher_repetition"

    def reason(self, text: str) -> str | None:
        total = max(1, len(text))
        paras = [p.strip() for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
        count, chars = _duplicates(paras)
        if paras and count / len(paras) > self.dup_para_frac:
            return f"{self.name}:dup_para_frac"
        if chars / total > self.dup_para_char_frac:
            return f"{self.name}:dup_para_char_frac"
        lines = [ln for ln in text.splitlines() if ln.strip()]
        count, chars = _duplicates(lines)
        if lines and count / len(lines) > self.dup_line_frac:
            return f"{self.name}:dup_line_frac"
        if chars / total > self.dup_line_char_frac:
            return f"{self.name}:dup_line_char_frac"
        ws = words(text)
        for n, limit in self.top_ngrams:
            if top_ngram_char_fraction(ws, n, total) > limit:
                return f"{self.name}:top_{n}_gram"
        for n, limit in self.dup_ngrams:
            if dup_ngram_char_fraction(ws, n, total) > limit:
                return f"{self.name}:duplicated_{n}_grams"
        return None


@dataclass
class C4Lines(Stage):
    """C4's line-level cleaning (rewrites the text) and its document-level rules."""

    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    name = "c4_lines"

    def clean(self, text: str) -> tuple[str | None, str | None]:
        """(cleaned text, None) or (None, rule that removed the document)."""
        low = text.lower()
        if "lorem ipsum" in low:
            return None, f"{self.name}:lorem_ipsum"
        if "{" in text:
            return None, f"{self.name}:curly_bracket"
        kept = []
        for line in text.splitlines():
            line = line.strip()
            ws = line.split()
            if (not line.endswith(TERMINAL) or line.endswith("...") or len(ws) < self.min_words_per_line
                    or max(map(len, ws)) > self.max_word_length):
                continue
            low_line = line.lower()
            if "javascript" in low_line or any(p in low_line for p in POLICY):
                continue
            kept.append(line)
        out = "\n".join(kept)
        if len(re.findall(r"[.!?]+(?:\s|$)", out)) < self.min_sentences:
            return None, f"{self.name}:min_sentences"
        return out, None

    def __call__(self, docs: Iterator[Doc], stats: StageStats, ctx: Context) -> Iterator[Doc]:
        for doc in docs:
            text, why = self.clean(doc[ctx.text_field])
            if why is not None:
                stats.removed[why] += 1
            else:
                yield {**doc, ctx.text_field: text}


@dataclass
class LengthFilter(Filter):
    min_chars: int = 0
    max_chars: int | None = None
    name = "length"

    def reason(self, text: str) -> str | None:
        if len(text) < self.min_chars:
            return f"{self.name}:min_chars"
        if self.max_chars is not None and len(text) > self.max_chars:
            return f"{self.name}:max_chars"
        return None


@dataclass
class SymbolFilter(Filter):
    """Fraction of characters that are not letters, digits or whitespace."""

    max_symbol_ratio: float = 0.3
    name = "symbols"

    def reason(self, text: str) -> str | None:
        if not text:
            return None
        symbols = sum(not (c.isalnum() or c.isspace()) for c in text)
        return f"{self.name}:max_symbol_ratio" if symbols / len(text) > self.max_symbol_ratio else None
