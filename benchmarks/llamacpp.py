"""llama.cpp as a benchmark peer: built from the sources vendored in the llama-cpp-python sdist,
fed checkpoints converted by its own converter and quantized by its own ``llama-quantize``.

``build(src, targets)`` extracts the sdist once (``bench_out/llamacpp``) and builds the CMake
targets that are not built yet (``GGML_NATIVE``: this machine's ISA). ``ggufs(tree, path, kinds)``
converts a Hugging Face checkpoint directory to f16 GGUF and quantizes it to each of ``kinds``
(Q4_0, Q8_0, ...), cached beside the checkpoint. The converter's BPE pre-tokenizer check does not
know leanlm's tokenizer (GPT-2's byte-level regex), so its lookup is pointed at "gpt-2"; and for
Llama checkpoints it tries a SentencePiece vocabulary first, needing the sentencepiece package
only to find there is none, so that step is skipped.

(``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` fetches the sdist.)
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from common import CACHE

SDIST = CACHE / "llama_cpp_python-0.3.36.tar.gz"
CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
def _no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("no tokenizer.model")
conversion.base.TextModel._set_vocab_sentencepiece = _no_sentencepiece
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build(src: Path, targets: tuple[str, ...]) -> Path:
    """llama.cpp's source tree from the sdist, with ``targets`` built (cached)."""
    root = CACHE / "llamacpp"
    tree = next(root.glob("*/vendor/llama.cpp"), None)
    if tree is None:
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tar:
            tar.extractall(root, filter="data")
        tree = next(root.glob("*/vendor/llama.cpp"))
    missing = [t for t in targets if not (tree / "build/bin" / t).is_file()]
    if missing:
        subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON"], cwd=tree, check=True)
        subprocess.run(["cmake", "--build", "build", "-j", "--target", *missing], cwd=tree, check=True)
    return tree


def ggufs(tree: Path, path: Path, kinds: tuple[str, ...] = ("Q4_0", "Q8_0"),
          out_dir: Path | None = None) -> dict[str, Path]:
    """{"f16": ..., kind: ...} GGUF files of the checkpoint ``path`` (in ``out_dir``, default
    beside it), made by llama.cpp's converter and ``llama-quantize`` when not there yet."""
    out_dir = out_dir or path
    out = {"f16": out_dir / "model-f16.gguf", **{k: out_dir / f"model-{k.lower()}.gguf" for k in kinds}}
    if not out["f16"].is_file():
        subprocess.run([sys.executable, "-c", CONVERT, str(tree), str(path), "--outfile", str(out["f16"]),
                        "--outtype", "f16"], check=True, capture_output=True)
    for kind in kinds:
        if not out[kind].is_file():
            subprocess.run([str(tree / "build/bin/llama-quantize"), str(out["f16"]), str(out[kind]), kind],
                           check=True, capture_output=True)
    return out
