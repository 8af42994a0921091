"""Schemathesis against ``leanlm serve`` on the default model, as a client would meet it: the API
key sent, positive cases naming the served model (``schemathesis_hooks.py``), every check but
``positive_data_acceptance`` (a schema-valid request may still be refused for what JSON Schema
cannot say: prompt tokens + max_tokens past the context, min_tokens > max_tokens).

    python benchmarks/bench_fuzz.py                      # 100 examples per operation and phase
    python benchmarks/bench_fuzz.py --max-examples 500 -- --policy fcfs   # server flags after --
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_soak import machine_line
from common import free_port, start_server

KEY = "sk-fuzz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("server_args", nargs="*", help="extra `leanlm serve` flags (after --)")
    args = p.parse_args()
    here = Path(__file__).resolve().parent
    st = Path(sys.executable).with_name("st")
    print(f"# bench_fuzz: schemathesis {args.max_examples} examples per operation and phase; "
          f"server flags {args.server_args or 'default'}")
    print(f"# machine: {machine_line()}", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "leanlm.cli", "serve", "--port", str(port), "--api-key", KEY,
                         *args.server_args], url, "/health")
    try:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
        cmd = [str(st), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {KEY}", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--max-examples", str(args.max_examples),
               "--request-timeout", "300", "--no-color"]
        with tempfile.TemporaryDirectory() as scratch:  # st keeps a crash cache in its directory
            rc = subprocess.run(cmd, env=env, cwd=scratch, check=False).returncode
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    sys.exit(rc)


if __name__ == "__main__":
    main()
