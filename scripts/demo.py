"""`make demo`: start serve-sim on a free loopback port, run sample_prompts/ through the real CLI with a
live progress bar, print the summary and a few answers, stop the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from gptoss_batch.sim.testing import start_sim

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "demo"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    # A slower engine than the test default, so the progress bar has something to show.
    with start_sim("--max-num-seqs", "8", "--decode-base-s", "0.02", "--seed", "7") as sim:
        print(f"serve-sim is up at {sim.base_url}", flush=True)
        code = 0
        for name, extra in (("quantum.jsonl", []), ("batch_api.jsonl", []),
                            ("products.csv", ["--template", "Write a one-line ad for our {name}: {feature}.",
                                              "--id-column", "sku"])):
            out = OUT / f"{Path(name).stem}.results.jsonl"
            cmd = [sys.executable, "-m", "gptoss_batch", "run", str(ROOT / "sample_prompts" / name), "-o", str(out),
                   "--overwrite", "--base-url", sim.base_url, "--model", "gpt-oss-20b", "--concurrency", "6",
                   "--max-tokens", "48", "--progress", "rich", *extra]
            print(f"\n$ gptoss-batch run sample_prompts/{name} -o {out.relative_to(ROOT)} ...", flush=True)
            code = subprocess.call(cmd) or code
        print("\nA few answers from out/demo/quantum.results.jsonl:")
        with open(OUT / "quantum.results.jsonl", "rb") as f:
            for line in list(f)[:3]:
                r = orjson.loads(line)
                print(f"  {r['id']}: {str(r.get('text'))[:100]}...")
        print(f"\nSummary JSON: {OUT.relative_to(ROOT)}/quantum.results.jsonl.summary.json")
        return code


if __name__ == "__main__":
    sys.exit(main())
