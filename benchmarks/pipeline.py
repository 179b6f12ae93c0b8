"""The whole `gptoss-batch run` pipeline against the tools a user would pick instead: CPU per request.

Every client is its own process, run on the same generated rows (``{"id", "prompt"}``, chat route,
``max_tokens`` 16) against the same instant server (benchmarks/instant_server.py: nginx when installed,
else its asyncio server) pinned to one CPU, with the client pinned to another:

    gptoss-batch   ``python -m gptoss_batch run ROWS -o OUT --concurrency N --progress plain`` (fsync policy
                   at its default); its run loop's CPU is the summary's ``client_cpu_s`` (read rows, build
                   bodies, send, parse, write JSONL, progress); start-up and the validating first pass are
                   in the whole-process figure only
    bare           benchmarks/peers/bare.py: the floor, N aiohttp workers doing the same job with nothing else
    bare, GC tuned the same, with the garbage-collector settings gptoss-batch uses (like for like)
    tutorial       benchmarks/peers/tutorial.py: a coroutine per prompt up front, Semaphore, gather
    guidellm       guidellm's CLI in its concurrent mode, from .bench/guidellm (see peers/guidellm_runner.py);
                   no run-loop figure of its own: its start-up (torch, transformers) is measured once with a
                   one-request run and subtracted, shown as "after start-up"

Method: each cell is one process run to completion; CPU is user+sys from ``os.wait4`` (the process and the
children it reaped) and, for the run loop, what the process measured itself. Repeats interleave the clients
at each concurrency, so a busy neighbour hurts all of them alike; ratios are medians of per-repeat ratios.
guidellm costs ~5 ms of CPU per request, so it runs once per concurrency and every repeat at 256.

    python -m benchmarks.pipeline [--quick] [--json PATH] [--clients a,b] [--concurrency 64,256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import orjson

from benchmarks.instant_server import ServerChoice, instant_server
from benchmarks.measure import loadavg, machine, nginx_version, run_child, spread, stderr_line
from benchmarks.peers import guidellm_runner
from benchmarks.peers.common import MAX_TOKENS, MODEL

ClientName = Literal["gptoss-batch", "bare", "bare-gc", "tutorial", "guidellm"]
CLIENTS: tuple[ClientName, ...] = ("gptoss-batch", "bare", "bare-gc", "tutorial", "guidellm")
LABELS: dict[ClientName, str] = {"gptoss-batch": "gptoss-batch", "bare": "bare aiohttp loop",
                                 "bare-gc": "bare, GC tuned", "tutorial": "tutorial", "guidellm": "guidellm"}
CONCURRENCIES = (1, 64, 256, 1024)
GOAL_CONCURRENCY = 256
GOAL_RATIO = 1.2


@dataclass(frozen=True, slots=True)
class Plan:
    rows: int
    repeats: int
    concurrencies: tuple[int, ...]
    guidellm_repeats: int  # guidellm's repeats at every concurrency ...
    guidellm_goal_repeats: int  # ... and at GOAL_CONCURRENCY
    timeout_s: float


FULL = Plan(rows=20_000, repeats=3, concurrencies=CONCURRENCIES, guidellm_repeats=1, guidellm_goal_repeats=3,
            timeout_s=600)
QUICK = Plan(rows=2_000, repeats=1, concurrencies=(64, 256), guidellm_repeats=0, guidellm_goal_repeats=0,
             timeout_s=120)


@dataclass(frozen=True, slots=True)
class Sample:
    client: ClientName
    concurrency: int
    repeat: int
    requests: int
    ok: int
    process_cpu_s: float  # the whole process: interpreter start-up, imports, first pass, run, exit
    process_wall_s: float
    loop_cpu_s: float | None  # the run loop alone, as the process measured it (guidellm: start-up subtracted)
    loop_wall_s: float | None
    peak_rss_kib: int
    mean_concurrency: float | None = None  # guidellm's own measure of requests in flight

    @property
    def loop_us(self) -> float | None:
        return None if self.loop_cpu_s is None else self.loop_cpu_s / max(self.requests, 1) * 1e6

    @property
    def process_us(self) -> float:
        return self.process_cpu_s / max(self.requests, 1) * 1e6

    @property
    def requests_per_s(self) -> float:
        wall = self.loop_wall_s if self.loop_wall_s else self.process_wall_s
        return self.requests / wall if wall > 0 else 0.0


@dataclass(slots=True)
class Report:
    environment: dict[str, str]
    plan: Plan
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    guidellm_startup_cpu_s: float | None = None


def write_rows(path: Path, rows: int) -> Path:
    with path.open("wb") as f:
        for i in range(rows):
            f.write(orjson.dumps({"id": f"row-{i:07d}", "prompt": f"Tell me about the number {i} in a few words."})
                    + b"\n")
    return path


# -- one cell per client ---------------------------------------------------------------------------------


def _ours(base_url: str, rows: Path, work: Path, concurrency: int, plan: Plan, repeat: int) -> Sample:
    out = work / f"ours-{concurrency}-{repeat}.jsonl"
    cmd = [sys.executable, "-m", "gptoss_batch", "run", str(rows), "-o", str(out), "--base-url", base_url,
           "--model", MODEL, "--max-tokens", str(MAX_TOKENS), "--concurrency", str(concurrency),
           "--progress", "plain"]
    child = run_child(cmd, timeout_s=plan.timeout_s).check("gptoss-batch run")
    summary = orjson.loads(Path(f"{out}.summary.json").read_bytes())
    for p in work.glob(f"{out.name}*"):
        p.unlink()
    return Sample("gptoss-batch", concurrency, repeat, summary["rows"]["done"], summary["rows"]["ok"],
                  child.cpu_s, child.wall_s, float(summary["client_cpu_s"]), float(summary["wall_s"]),
                  child.peak_rss_kib)


def _peer(client: ClientName, base_url: str, rows: Path, work: Path, concurrency: int, plan: Plan,
          repeat: int) -> Sample:
    out = work / f"{client}-{concurrency}-{repeat}.jsonl"
    module = "tutorial" if client == "tutorial" else "bare"
    cmd = [sys.executable, "-m", f"benchmarks.peers.{module}", str(rows), str(out), "--base-url", base_url,
           "--concurrency", str(concurrency)]
    if client == "bare-gc":
        cmd.append("--gc-tuned")
    child = run_child(cmd, timeout_s=plan.timeout_s).check(client)
    report = orjson.loads(child.stdout)
    out.unlink(missing_ok=True)
    return Sample(client, concurrency, repeat, report["requests"], report["ok"], child.cpu_s, child.wall_s,
                  report["loop_cpu_s"], report["wall_s"], child.peak_rss_kib)


def _guidellm(exe: Path, base_url: str, rows: Path, n_rows: int, work: Path, concurrency: int, plan: Plan,
              repeat: int, startup_cpu_s: float | None) -> Sample:
    out = work / f"guidellm-{concurrency}-{repeat}.json"
    cmd = guidellm_runner.command(exe, base_url, rows, n_rows, concurrency, out)
    child = run_child(cmd, timeout_s=plan.timeout_s, cwd=work, env=guidellm_runner.environment())
    child.check("guidellm")
    rep = guidellm_runner.read_report(out)
    out.unlink(missing_ok=True)
    loop = None if startup_cpu_s is None else max(child.cpu_s - startup_cpu_s, 0.0)
    return Sample("guidellm", concurrency, repeat, rep.requests, rep.ok, child.cpu_s, child.wall_s, loop,
                  rep.duration_s, child.peak_rss_kib, rep.mean_concurrency)


def _guidellm_startup(exe: Path, base_url: str, rows: Path, work: Path, plan: Plan) -> float:
    """CPU of a one-request guidellm run: its fixed cost (imports of torch/transformers, worker start-up)."""
    out = work / "guidellm-startup.json"
    child = run_child(guidellm_runner.command(exe, base_url, rows, 1, 1, out), timeout_s=plan.timeout_s,
                      cwd=work, env=guidellm_runner.environment()).check("guidellm (one request)")
    out.unlink(missing_ok=True)
    return child.cpu_s


# -- the run ---------------------------------------------------------------------------------------------


def run(plan: Plan, clients: Sequence[ClientName] = CLIENTS, progress: Callable[[str], None] | None = None,
        server_kind: ServerChoice = "auto") -> Report:
    env = machine()
    env["loadavg_1m_at_start"] = loadavg()
    report = Report(env, plan)
    exe = guidellm_runner.guidellm_bin() if "guidellm" in clients else None
    if "guidellm" in clients:
        if exe is None:
            report.notes.append("guidellm: not installed, so not measured; install it with "
                                f"{guidellm_runner.INSTALL_HINT}")
        elif plan.guidellm_repeats == 0 and plan.guidellm_goal_repeats == 0:
            report.notes.append("guidellm: not run in --quick (it costs ~5 ms of CPU per request)")
            exe = None
        else:
            env["guidellm"] = guidellm_runner.guidellm_version() or "?"
    allowed = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp, instant_server(kind=server_kind) as srv:
        work = Path(tmp)
        env["server"] = f"{srv.kind}" + (f" {nginx_version()}" if srv.kind == "nginx" else "") + f" on CPU {srv.cpu}"
        env["client_cpu"] = str(srv.pin_client())
        rows = write_rows(work / "rows.jsonl", plan.rows)
        if exe is not None:
            try:
                report.guidellm_startup_cpu_s = _guidellm_startup(exe, srv.base_url, rows, work, plan)
            except RuntimeError as exc:
                report.notes.append(f"guidellm could not run here, so it is not in the table: {exc}")
                exe = None
        for repeat in range(plan.repeats):
            for concurrency in plan.concurrencies:
                for client in clients:
                    if client == "guidellm":
                        goal = concurrency == GOAL_CONCURRENCY
                        wanted = plan.guidellm_goal_repeats if goal else plan.guidellm_repeats
                        if exe is None or repeat >= wanted:
                            continue
                        s = _guidellm(exe, srv.base_url, rows, plan.rows, work, concurrency, plan, repeat,
                                      report.guidellm_startup_cpu_s)
                    elif client == "gptoss-batch":
                        s = _ours(srv.base_url, rows, work, concurrency, plan, repeat)
                    else:
                        s = _peer(client, srv.base_url, rows, work, concurrency, plan, repeat)
                    report.samples.append(s)
                    if progress is not None:
                        loop = f"{s.loop_us:7.0f}" if s.loop_us is not None else "      –"
                        progress(f"pipeline repeat {repeat + 1}/{plan.repeats} c={concurrency:<4} {client:<12} "
                                 f"{s.requests:>6} req  loop {loop} µs/req  process {s.process_us:7.0f} µs/req  "
                                 f"{s.requests_per_s:7,.0f} req/s  RSS {s.peak_rss_kib / 1024:6.0f} MB")
    os.sched_setaffinity(0, allowed)
    env["loadavg_1m_at_end"] = loadavg()
    return report


# -- rendering ------------------------------------------------------------------------------------------


def _by(report: Report, client: ClientName, concurrency: int) -> list[Sample]:
    return sorted((s for s in report.samples if s.client == client and s.concurrency == concurrency),
                  key=lambda s: s.repeat)


def ratios(report: Report, client: ClientName, base: ClientName, concurrency: int) -> list[float]:
    """Per-repeat ratios of run-loop CPU per request, ``client / base``."""
    a = {s.repeat: s.loop_us for s in _by(report, client, concurrency)}
    b = {s.repeat: s.loop_us for s in _by(report, base, concurrency)}
    return [x / y for r, x in a.items() if x is not None and (y := b.get(r)) is not None and y > 0]


def _present(report: Report) -> list[ClientName]:
    return [c for c in CLIENTS if any(s.client == c for s in report.samples)]


def format_markdown(report: Report) -> str:
    env = report.environment
    plan = report.plan
    clients = _present(report)
    concurrencies = [c for c in plan.concurrencies if any(s.concurrency == c for s in report.samples)]
    lines = [
        f"{plan.rows:,} rows per run, {plan.repeats} repeat(s) (guidellm: {plan.guidellm_repeats} per "
        f"concurrency, {plan.guidellm_goal_repeats} at {GOAL_CONCURRENCY}); {env['server']}, clients on CPU "
        f"{env['client_cpu']}; load average {env['loadavg_1m_at_start']} → {env.get('loadavg_1m_at_end', '?')}. "
        "Median (min–max) over repeats.",
        "",
        "**Run loop: CPU µs per request** (user+sys of the client process while it reads rows, builds bodies, "
        "sends, parses and writes results; start-up excluded)",
        "",
        "| concurrency | " + " | ".join(LABELS[c] for c in clients) + " | gptoss-batch ÷ bare |",
        "|---:|" + "---:|" * (len(clients) + 1),
    ]
    for conc in concurrencies:
        cells = []
        for client in clients:
            values = [s.loop_us for s in _by(report, client, conc) if s.loop_us is not None]
            cells.append(spread(values))
        r = ratios(report, "gptoss-batch", "bare", conc)
        cells.append(f"×{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})" if len(r) > 1
                     else f"×{r[0]:.2f}" if r else "–")
        lines.append(f"| {conc} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Whole process: CPU µs per request, requests/s, peak RSS** (interpreter start-up, imports, "
        "gptoss-batch's validating first pass and exit included; req/s over the run loop's wall time)",
        "",
        "| concurrency | " + " | ".join(f"{LABELS[c]} µs/req · req/s · MB" for c in clients) + " |",
        "|---:|" + "---:|" * len(clients),
    ]
    for conc in concurrencies:
        cells = []
        for client in clients:
            ss = _by(report, client, conc)
            if not ss:
                cells.append("–")
                continue
            rate = statistics.median(s.requests_per_s for s in ss)
            rss = statistics.median(s.peak_rss_kib for s in ss) / 1024
            cell = f"{spread([s.process_us for s in ss])} · {rate:,.0f} · {rss:,.0f}"
            conc_seen = [s.mean_concurrency for s in ss if s.mean_concurrency is not None]
            if conc_seen:
                cell += f" (in flight: {statistics.median(conc_seen):.1f})"
            cells.append(cell)
        lines.append(f"| {conc} | " + " | ".join(cells) + " |")
    lines += ["", *goal_lines(report)]
    if report.guidellm_startup_cpu_s is not None:
        lines.append(f"- guidellm's fixed cost (one-request run): {report.guidellm_startup_cpu_s:.1f} s of CPU, "
                     "subtracted from its whole-process CPU to give its run-loop column.")
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines)


def goal_lines(report: Report) -> list[str]:
    conc = GOAL_CONCURRENCY
    ours = [s.loop_us for s in _by(report, "gptoss-batch", conc) if s.loop_us is not None]
    if not ours:
        return []
    out = []
    r = ratios(report, "gptoss-batch", "bare", conc)
    if r:
        verdict = "met" if statistics.median(r) <= GOAL_RATIO else "missed"
        out.append(f"- Goal at concurrency {conc}: run-loop CPU per request ≤ {GOAL_RATIO}× the bare aiohttp loop: "
                   f"×{statistics.median(r):.2f} (median of per-repeat ratios) — **{verdict}**.")
    rg = ratios(report, "gptoss-batch", "bare-gc", conc)
    if rg:
        out.append(f"- Against the bare loop with the same GC tuning: ×{statistics.median(rg):.2f}.")
    for peer in ("tutorial", "guidellm"):
        theirs = [s.loop_us for s in _by(report, peer, conc) if s.loop_us is not None]
        if theirs:
            below = statistics.median(ours) < statistics.median(theirs)
            out.append(f"- Below {peer} at {conc}: {statistics.median(ours):,.0f} vs {statistics.median(theirs):,.0f} "
                       f"µs/req — **{'met' if below else 'missed'}**.")
    return out


def to_json(report: Report) -> bytes:
    samples = [{**asdict(s), "loop_us_per_request": s.loop_us, "process_us_per_request": s.process_us,
                "requests_per_s": s.requests_per_s} for s in report.samples]
    return orjson.dumps({"environment": report.environment, "plan": asdict(report.plan), "samples": samples,
                         "notes": report.notes, "guidellm_startup_cpu_s": report.guidellm_startup_cpu_s},
                        option=orjson.OPT_INDENT_2)


def markdown(quick: bool) -> str:
    """Entry for ``python -m benchmarks``."""
    return format_markdown(run(QUICK if quick else FULL, progress=stderr_line))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 rows, concurrency 64 and 256, 1 repeat, no guidellm")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    ap.add_argument("--clients", default=",".join(CLIENTS), help=f"comma-separated subset of {', '.join(CLIENTS)}")
    ap.add_argument("--concurrency", help="comma-separated concurrencies (default: the plan's)")
    ap.add_argument("--rows", type=int, help="rows per run (default: the plan's)")
    ap.add_argument("--repeats", type=int, help="repeats (default: the plan's)")
    ap.add_argument("--server", choices=["auto", "nginx", "asyncio"], default="auto")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.concurrency:
        plan = replace(plan, concurrencies=tuple(int(c) for c in args.concurrency.split(",")))
    if args.rows:
        plan = replace(plan, rows=args.rows)
    if args.repeats:
        plan = replace(plan, repeats=args.repeats)
    clients = [c for c in CLIENTS if c in args.clients.split(",")]
    report = run(plan, clients, progress=stderr_line, server_kind=args.server)
    print(format_markdown(report))
    if args.json is not None:
        args.json.write_bytes(to_json(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
