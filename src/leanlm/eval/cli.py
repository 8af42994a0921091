"""``leanlm eval`` (perplexity, zero-shot tasks and agreement with a reference model, for one
model), ``leanlm compare`` (the methods x bits grid) and ``leanlm quantize``.

``quantize`` lives here rather than in ``quant/cli.py`` because it reads calibration text with
the data layer (:mod:`leanlm.data.text`) and the quantization package may not import data: a
command lives in the lowest package that may import all it needs (as ``data doremi`` lives in
``train/cli.py``), and ``compare`` here already runs the same quantization pipeline. Its
``--method`` is a name in :data:`leanlm.quant.REGISTRY` (:func:`leanlm.quant.method_config`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from leanlm.cliutil import INT8_ACTIVATIONS_HELP, ModelArg, resolve_model, weights_bytes
from leanlm.errors import LeanLMError


def eval_(
    model: ModelArg = None,
    ppl: Annotated[Path | None, typer.Option(
        help="Perplexity text: a text file, .jsonl (\"text\"), or a corpus dir (its val split).")] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Comma list of tasks: shipped names (next_line_code, ...), JSONL files, or 'all'.")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Corpus directory: training-stream loss per domain (the trainer's protocol).")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="A reference model (e.g. the unquantized one): KL divergence and answer flips.")] = None,
    seq_len: Annotated[int, typer.Option(help="Perplexity window length.")] = 512,
    stride: Annotated[int | None, typer.Option(help="Sliding windows every STRIDE tokens.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows or choices per forward.")] = 8,
    max_windows: Annotated[int, typer.Option(help="Windows scored, evenly spaced (0 = all).")] = 0,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    bf16_kernels: Annotated[bool, typer.Option(
        "--bf16-kernels", help="Let quantized layers of an fp32 model run the packed int4/int8 CPU "
        "kernels, which compute in bf16 (faster; the figures are then not fp32 figures).")] = False,
    int8_activations: Annotated[bool, typer.Option(help=INT8_ACTIVATIONS_HELP + " Implies --bf16-kernels.")]
    = False,
) -> None:
    """Evaluate MODEL: perplexity (GPTQ protocol), zero-shot tasks, agreement with a reference."""
    import torch

    from leanlm import kernels
    from leanlm.checkpoint import load_model
    from leanlm.data.text import read_texts
    from leanlm.eval.evaluate import evaluate
    from leanlm.eval.tasks import shipped_tasks
    from leanlm.kernels import cpu_vnni
    from leanlm.quant import quantized_linears
    from leanlm.tokenizer import load_tokenizer

    if ppl is None and tasks is None and data is None:
        raise LeanLMError("nothing to evaluate: give --ppl FILE, --tasks NAMES and/or --data CORPUS")
    names = [] if tasks is None else list(shipped_tasks()) if tasks == "all" else \
        [t.strip() for t in tasks.split(",") if t.strip()]
    texts = read_texts(ppl, "val", "perplexity text") if ppl is not None else None
    path = resolve_model(model)
    lm = load_model(path, dtype=dtype, pack=True).eval()
    tok = load_tokenizer(path)
    ref = load_model(reference, dtype=dtype, pack=True).eval() if reference is not None else None
    act8 = int8_activations or kernels.int8_activations()
    bf16 = bf16_kernels or kernels.bf16_kernels() or act8
    with kernels.allow_bf16_kernels(bf16), kernels.quantizing_activations(act8):
        result = {"model": str(path), **evaluate(lm, tok, texts, names, seq_len, stride, max_windows,
                                                 ref, batch_size)}
        if data is not None:
            result["domains"] = _domain_losses(lm, tok, data, seq_len, batch_size, max_windows)
    if quantized_linears(lm):  # what the figures are: fp32 results, or those of the bf16 kernels
        fp32 = lm.embed_tokens.weight.dtype == torch.float32
        result["quantized_compute"] = (
            "fp32 (dequantized)" if fp32 and not bf16
            else "int8 activations (VNNI) where a layer can, else bf16" if act8 and cpu_vnni.available()
            else "bf16 (packed CPU kernels)")
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    _print(result)


def _domain_losses(lm: Any, tok: Any, data: Path, seq_len: int, batch_size: int, max_windows: int) -> dict:
    import tempfile

    import torch

    from leanlm.data.tokens import load_tokens, tokenize_corpus
    from leanlm.eval.perplexity import perplexity, stream_loss

    if tok.eos_token_id is None:
        raise LeanLMError("the tokenizer has no eos_token (the document separator)")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = tokenize_corpus(data, tok, tmp, tok.eos_token_id, splits=("val",))
        for dom, f in files.items():
            with torch.inference_mode():  # (stream_loss itself is no_grad: the trainer calls it too)
                s, n = stream_loss(lm, load_tokens(f["val"]), seq_len, tok.eos_token_id, batch_size,
                                   max_windows)
            if n:
                out[dom] = {"tokens": n, "loss": s / n, "ppl": perplexity(s / n)}
    return out


def _print(result: dict) -> None:
    console = Console()
    table = Table(title=result["model"])
    for col in ("measure", "value"):
        table.add_column(col)
    if "perplexity" in result:
        p = result["perplexity"]
        how = f"windows of {p['seq_len']}" + (f", stride {p['stride']}" if p["stride"] else "")
        table.add_row(f"perplexity ({p['tokens']:,} tokens, {how})", f"{p['ppl']:.4f}")
    if "kl" in result:
        table.add_row("KL(reference || model), mean per token", f"{result['kl']:.5f}")
    if "quantized_compute" in result:
        table.add_row("quantized layers computed in", result["quantized_compute"])
    for name, t in result.get("tasks", {}).items():
        flips = f", flips {t['flips']:.3f}" if "flips" in t else ""
        table.add_row(f"{name} ({t['n']} questions)",
                      f"acc {t['acc']:.3f}, acc_norm {t['acc_norm']:.3f}{flips}")
    for dom, d in result.get("domains", {}).items():
        table.add_row(f"{dom} (val, {d['tokens']:,} tokens)", f"loss {d['loss']:.4f}, ppl {d['ppl']:.2f}")
    console.print(table)


def compare(
    model: ModelArg = None,
    out: Annotated[Path | None, typer.Option(help="Output directory: cells/, report.md, plots (required).")]
    = None,
    ppl: Annotated[Path | None, typer.Option(
        help="Perplexity text (required): a text file, .jsonl, or a corpus dir (its val split).")] = None,
    methods: Annotated[str, typer.Option(help="Comma list: rtn, gptq, awq (and smoothquant, llm-int8).")]
    = "rtn,gptq,awq",
    bits: Annotated[str, typer.Option(help="Comma list of weight bits.")] = "8,4,3",
    group_size: Annotated[int, typer.Option(help="Input columns per scale (-1: per channel).")] = 128,
    tasks: Annotated[str, typer.Option(help="Comma list of tasks, 'all' (the shipped ones) or ''.")] = "all",
    calib: Annotated[Path | None, typer.Option(
        help="Calibration text (default: a sample of the Python standard library).")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Perplexity window length.")] = 512,
    max_windows: Annotated[int, typer.Option(help="Perplexity/KL windows, evenly spaced (0 = all).")] = 0,
    speed: Annotated[bool, typer.Option(help="Measure tokens/s and generation memory.")] = True,
) -> None:
    """Quantize MODEL with every method x bit width, measure each, and write a report with plots.
    An interrupted run resumes: finished cells are kept in OUT/cells."""
    from leanlm.data.text import read_texts
    from leanlm.eval.compare import GridConfig, run_grid
    from leanlm.eval.report import write_report
    from leanlm.eval.tasks import shipped_tasks

    if out is None or ppl is None:
        raise LeanLMError("--out DIR and --ppl TEXT are required")
    try:
        bit_list = [int(b) for b in bits.split(",")]
    except ValueError:
        raise LeanLMError(f"--bits {bits!r}: expected integers like 8,4,3") from None
    names = list(shipped_tasks()) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    cfg = GridConfig([m.strip() for m in methods.split(",") if m.strip()], bit_list, group_size, names,
                     seq_len, max_windows, calib_samples, speed=speed)
    texts = read_texts(ppl, "val", "perplexity text")
    calib_texts = read_texts(calib) if calib is not None else None
    path = resolve_model(model)
    console = Console(stderr=True)
    cells = run_grid(path, out, cfg, texts, calib_texts, log=lambda m: console.print(m, highlight=False))
    report = write_report(cells, out, f"Quantization grid: {path.name}")
    console.print(f"report: {report} (plots beside it)")


# every name in leanlm.quant.REGISTRY (a test keeps them in step), most used first
QUANT_METHODS_HELP = "gptq | awq | rtn | smoothquant | llm-int8 | fp8."


def quantize(
    model: ModelArg = None,
    method: Annotated[str, typer.Option(help=QUANT_METHODS_HELP)] = "gptq",
    bits: Annotated[int, typer.Option(help="Weight bits (2, 3, 4, 8) for gptq/awq/rtn.")] = 4,
    group_size: Annotated[str, typer.Option(
        help="Input columns per scale: 32/64/128/256, -1 = per channel, or auto: the largest of "
             "128/64/32 that divides every layer's input size.")] = "auto",
    allow_partial_groups: Annotated[bool, typer.Option(
        help="Accept a group size that leaves a partial last group (GPTQModel, AutoAWQ and vLLM "
             "will not load the result).")] = False,
    act_order: Annotated[bool, typer.Option(
        help="GPTQ: quantize columns in decreasing Hessian order.")] = False,
    group_aware: Annotated[bool, typer.Option(
        help="GPTQ without act-order: visit whole groups, and the columns in each, in decreasing "
             "Hessian order (GAR, GPTQModel's default); the checkpoint needs no act-order kernel. "
             "--no-group-aware --damp-percent 0.01: the reference implementation's settings.")] = True,
    damp_percent: Annotated[float, typer.Option(help="GPTQ: Hessian dampening, a fraction of its mean "
                                                     "diagonal (GPTQModel's default).")] = 0.05,
    static_groups: Annotated[bool, typer.Option(help="GPTQ: choose all group scales up front.")] = False,
    lm_head: Annotated[bool, typer.Option(
        "--lm-head", help="Quantize the LM head too (gptq, rtn, llm-int8, fp8): what a CPU decode step "
                          "reads shrinks by the head's share (a tied embedding stays as it is).")] = False,
    lm_head_bits: Annotated[int | None, typer.Option(
        help="Bits of the LM head (implies --lm-head; 8 is per channel, the int8 CPU kernel's "
             "layout; llama.cpp keeps its head at 6-8 bits). Default: --bits.")] = None,
    sym: Annotated[bool | None, typer.Option(help="Symmetric codes (default: on, except AWQ).")] = None,
    calib: Annotated[Path | None, typer.Option(
        help="Calibration text: .jsonl (\"text\" field), a text file or a corpus directory; "
             "default: a sample of the Python standard library sources.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for the calibration windows.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output directory (required).")] = None,
    format: Annotated[str | None, typer.Option(
        help="gptq | awq (weight-only; default gptq, awq for --method awq) | w8a8 | fp8 (the "
             "method's own format by default).")] = None,
    dtype: Annotated[str, typer.Option(help="dtype to calibrate in.")] = "float32",
) -> None:
    """Quantize MODEL with a post-training method and write the quantized checkpoint to --out."""
    import time

    import torch

    from leanlm.checkpoint import load_model
    from leanlm.config import ModelConfig
    from leanlm.data.text import default_texts, read_texts
    from leanlm.quant import REGISTRY, calibration_tokens, method_config, quantize_
    from leanlm.quant.api import check_lm_head, choose_group_size
    from leanlm.quant.formats import save_quantized
    from leanlm.tokenizer import load_tokenizer

    gptq_options = {"group_aware": group_aware, "damp_percent": damp_percent}
    if group_size != "auto" and not group_size.lstrip("-").isdigit():
        raise LeanLMError(f"--group-size {group_size!r}: expected a number or auto")
    method_config(method, bits=bits, group_size=128 if group_size == "auto" else int(group_size), sym=sym,
                  act_order=act_order, static_groups=static_groups,
                  **gptq_options)  # bad options fail before loading
    lm_head = lm_head or lm_head_bits is not None
    if lm_head:
        check_lm_head(REGISTRY[method])
    if lm_head_bits is not None:
        method_config(method, bits=lm_head_bits, group_size=-1, sym=sym, act_order=act_order,
                      static_groups=static_groups, **gptq_options)
    if out is None:
        raise LeanLMError("--out DIR is required (where the quantized checkpoint is written)")
    path = resolve_model(model)
    tok = load_tokenizer(path)
    texts = read_texts(calib) if calib is not None else None  # read before the slow work
    lm = load_model(path, dtype=dtype)
    groups = 128
    if hasattr(REGISTRY[method].config_cls, "group_size"):  # weight-only methods
        groups = choose_group_size(lm, group_size, allow_partial_groups)
        if group_size == "auto":
            Console().print(f"--group-size auto: {groups}")
    config = method_config(method, bits=bits, group_size=groups, sym=sym, act_order=act_order,
                           static_groups=static_groups, **gptq_options)
    saved_dtype = ModelConfig.from_json_file(path / "config.json").torch_dtype
    tokens = None
    if REGISTRY[method].calibrated:
        tokens = calibration_tokens(texts or default_texts(), tok, samples, seq_len, seed)
    start = time.perf_counter()
    head = lm_head
    if lm_head_bits is not None and lm_head_bits != bits:
        head = method_config(method, bits=lm_head_bits, group_size=-1 if lm_head_bits == 8 else groups,
                             sym=sym, act_order=act_order, static_groups=static_groups, **gptq_options)
    quantize_(lm, config, tokens, lm_head=head)
    elapsed = time.perf_counter() - start
    if saved_dtype in ("bfloat16", "float16", "float32"):
        lm.to(getattr(torch, saved_dtype))  # the unquantized tensors keep the checkpoint's dtype
    save_quantized(lm, out, tok, format=format or ("awq" if method == "awq" else None))
    before, after = weights_bytes(path), weights_bytes(out)
    Console().print(f"{method}: {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB "
                    f"({before / after:.2f}x smaller) in {elapsed:.1f} s; written to {out}")


def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own command line with leanlm's model type registered: every
    ``lm_eval`` option, e.g. ``leanlm lm-eval --model leanlm --model_args pretrained=DIR --tasks
    piqa``. (lm-eval finds only the model types it ships, so ``lm_eval --model leanlm`` cannot.)"""
    try:
        from lm_eval.__main__ import cli_evaluate

        import leanlm.eval.harness  # noqa: F401  (registers the "leanlm" model type)
    except ImportError:
        raise LeanLMError("lm-eval is not installed: pip install 'leanlm[eval]'") from None
    sys.argv = ["lm_eval", *ctx.args]
    cli_evaluate()
