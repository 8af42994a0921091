"""Each heuristic rule removes the text it targets, and keeps ordinary prose."""

from __future__ import annotations

import random

import pytest

from leanlm.data.filters import C4Lines, GopherQuality, GopherRepetition, LengthFilter, SymbolFilter

rng = random.Random(0)
VOCAB = ["river", "stone", "light", "house", "garden", "window", "morning", "letter", "silver",
         "quiet", "travel", "market", "winter", "answer", "simple", "yellow"]


def prose(sentences: int = 12) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(VOCAB) for _ in range(rng.randrange(6, 12))]
        out.append(f"The {' '.join(words)} of the {rng.choice(VOCAB)} and that was it.")
    return "\n".join(" ".join(out[i:i + 3]) for i in range(0, len(out), 3))


def test_prose_passes_every_rule() -> None:
    text = prose()
    assert GopherQuality().reason(text) is None
    assert GopherRepetition().reason(text) is None
    assert C4Lines().clean(text)[1] is None
    assert LengthFilter(min_chars=10).reason(text) is None and SymbolFilter().reason(text) is None


@pytest.mark.parametrize(("text", "rule"), [
    ("the cat and the dog", "min_words"),
    (" ".join(["a"] * 80) + " the and", "min_avg_word_length"),
    (" ".join(["incomprehensibilities"] * 60) + " the and", "max_avg_word_length"),
    (prose() + " #" * 40, "symbol_word_ratio"),
    ("\n".join(f"- {prose(1)}" for _ in range(12)), "bullet_lines_ratio"),
    ("\n".join(prose(1)[:-1] + "..." for _ in range(12)), "ellipsis_lines_ratio"),
    (" ".join(["river", "123", "456", "789", "0"] * 20) + " the and", "alpha_words_ratio"),
    (" ".join(rng.choice(VOCAB) for _ in range(80)), "stop_words"),
])
def test_gopher_quality_rules(text: str, rule: str) -> None:
    assert GopherQuality().reason(text) == f"gopher_quality:{rule}"


def test_gopher_repetition_rules() -> None:
    line = "The same line is repeated here again and again."
    paras = "\n\n".join([line] * 5 + [prose(2)])
    assert GopherRepetition().reason(paras) == "gopher_repetition:dup_para_frac"
    lines = "\n".join([line] * 4 + [prose(1) for _ in range(4)])  # 3 of 8 lines repeat one
    assert GopherRepetition().reason(lines) == "gopher_repetition:dup_line_frac"
    spam = " ".join(["buy cheap"] * 40) + " " + prose(3)
    assert GopherRepetition().reason(spam).startswith("gopher_repetition:top_2_gram")
    block = " ".join(rng.choice(VOCAB) for _ in range(40))
    doubled = prose(4) + " " + block + " " + block
    assert GopherRepetition().reason(doubled).startswith("gopher_repetition:duplicated_")


def test_c4_lines_rewrite_and_remove() -> None:
    text = (prose(9) + "\nClick here\nThis site uses cookies to improve things."
            "\nEnable javascript to continue.")
    cleaned, why = C4Lines().clean(text)
    assert why is None and "Click here" not in cleaned and "cookies" not in cleaned
    assert "javascript" not in cleaned and cleaned.count("\n") == 2
    assert C4Lines().clean(prose() + " lorem ipsum dolor.")[1] == "c4_lines:lorem_ipsum"
    assert C4Lines().clean("def f(): {return 1}.")[1] == "c4_lines:curly_bracket"
    assert C4Lines().clean("One sentence only, which is long enough.")[1] == "c4_lines:min_sentences"


def test_length_and_symbol_rules() -> None:
    assert LengthFilter(min_chars=5).reason("abc") == "length:min_chars"
    assert LengthFilter(max_chars=2).reason("abc") == "length:max_chars"
    assert SymbolFilter(max_symbol_ratio=0.2).reason("a+b=c; {x: [y, z]}!!") == "symbols:max_symbol_ratio"
