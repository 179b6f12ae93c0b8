"""`make demo-real`: install llama.cpp's llama-server and Gemma 3 270M into .venv-real (reused later), start the
server on a free loopback port, run sample_prompts/ through the real CLI with a live progress bar, print a few
real answers and the summary, stop the server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from scripts.real_servers import LLAMA_CTX_SIZE, LLAMA_PARALLEL, ensure_installed, start_llama_server

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "demo-real"
MAX_TOKENS = 48
# A 270M base model rambles and repeats itself: a low temperature and llama.cpp's repeat penalty (a field other
# servers would ignore or refuse) keep its answers on topic more often.
SAMPLING = ("--temperature", "0.3", "--param", "repeat_penalty=1.3")
# Gemma 3 270M here is a base model: it continues text well and follows a chat template poorly (the GGUF's
# template is ChatML, which it never saw). The completions route sends the messages' contents as plain text.
RUNS: tuple[tuple[str, list[str]], ...] = (
    ("quantum.jsonl", []),
    ("batch_api.jsonl", []),
    ("products.csv", ["--template", "Our {name} has a {feature}. Here is a one-line ad for it:", "--id-column", "sku"]),
)


def _prompt_of(row: dict[str, object]) -> str:
    """The row's prompt, or its last message's content."""
    prompt, messages = row.get("prompt"), row.get("messages")
    if isinstance(prompt, str):
        return prompt
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return ""


def main() -> int:
    t_start = time.perf_counter()
    install_s = ensure_installed("llama")
    shutil.rmtree(OUT, ignore_errors=True)  # results of an earlier demo: this one starts afresh
    OUT.mkdir(parents=True)
    progress = "rich" if sys.stderr.isatty() else "plain"
    code = 0
    t_server = time.perf_counter()
    with start_llama_server(log_dir=OUT) as server:
        print(f"llama-server is up at {server.base_url} in {time.perf_counter() - t_server:.1f} s "
              f"(Gemma 3 270M as {server.model!r}, --parallel {LLAMA_PARALLEL}, --ctx-size {LLAMA_CTX_SIZE}; "
              f"log {server.log_path.relative_to(ROOT)})", flush=True)
        for name, extra in RUNS:
            out = OUT / f"{Path(name).stem}.results.jsonl"
            cmd = [sys.executable, "-m", "gptoss_batch", "run", str(ROOT / "sample_prompts" / name), "-o", str(out),
                   "--base-url", server.base_url, "--model", server.model, "--route", "completions",
                   "--concurrency", str(LLAMA_PARALLEL), "--max-tokens", str(MAX_TOKENS), *SAMPLING,
                   "--progress", progress, *extra]
            print(f"\n$ gptoss-batch run sample_prompts/{name} -o {out.relative_to(ROOT)} --base-url {server.base_url}"
                  f" --model {server.model} --route completions -n {LLAMA_PARALLEL} --max-tokens {MAX_TOKENS} "
                  f"{' '.join(SAMPLING)} ...", flush=True)
            code = subprocess.call(cmd, timeout=600) or code
    rows = map(orjson.loads, (ROOT / "sample_prompts" / "quantum.jsonl").read_bytes().splitlines())
    prompts = {str(r.get("id")): _prompt_of(r) for r in rows}
    print("\nA few of Gemma's answers (out/demo-real/quantum.results.jsonl):")
    with open(OUT / "quantum.results.jsonl", "rb") as f:
        results = sorted(map(orjson.loads, f), key=lambda r: int(r["index"]))
        for r in results[:3]:
            text = " ".join(str(r.get("text") or r.get("error")).split())
            print(f"  {r['id']}  {prompts.get(r['id'], '')[:70]}\n      -> {text[:240]}")
    total_s = time.perf_counter() - t_start
    print(f"\nSummary JSON: {OUT.relative_to(ROOT)}/quantum.results.jsonl.summary.json. demo-real took {total_s:.0f} s"
          f" ({install_s:.0f} s of it installing).")
    return code


if __name__ == "__main__":
    sys.exit(main())
