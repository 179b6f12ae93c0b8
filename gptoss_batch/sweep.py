"""The sweep: the same rows at rising concurrency (or Poisson arrival rates), one measurement per level, the
knee, and the reports (terminal table, JSON, CSV, Markdown, PNG, every result line as JSONL).

Pure parts first (plan, rows, arrivals, figures, knee, report text); then the store (the report directory,
resumable level by level) and ``run_sweep``, which drives the ``Runner`` once per level.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import orjson
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gptoss_batch import __version__
from gptoss_batch.config import RunConfig
from gptoss_batch.errors import ConfigError, InputError, OutputError
from gptoss_batch.inputs import InputOptions, open_input
from gptoss_batch.job import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, TransportFactory, default_transport
from gptoss_batch.metrics import MetricsPoller, TextGetter, metrics_url_for
from gptoss_batch.records import Result, Row
from gptoss_batch.report import fmt_s, make_display, tick_forever
from gptoss_batch.runner import Runner
from gptoss_batch.sink import JsonlSink, OutputLock, move_aside, write_json_atomic
from gptoss_batch.stats import SummaryBuilder

Mode = Literal["concurrency", "rate"]

SWEEP_FORMAT = 1
# The knee: the lowest qualifying level within this share of the best qualifying throughput.
KNEE_SHARE = 0.95
# --levels auto doubles while each level beats the one before by more than this.
AUTO_MIN_GAIN = 0.05
AUTO_START = 1
# Default rows per level: this many per slot (or per request/s of rate), at least MIN_REQUESTS_PER_LEVEL.
REQUESTS_PER_SLOT = 4
MIN_REQUESTS_PER_LEVEL = 16
# Rate mode: an arrival this late (held back because every slot was busy) counts as late.
LATE_ARRIVAL_S = 0.01
SWEEP_JSON, SWEEP_CSV, SWEEP_MD, SWEEP_PNG, LEVELS_JSONL = (
    "sweep.json", "sweep.csv", "sweep.md", "sweep.png", "levels.jsonl")


# -- the plan --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SweepPlan:
    """What to measure. ``levels`` None means ``--levels auto`` (concurrency mode only)."""

    mode: Mode = "concurrency"
    levels: tuple[float, ...] | None = None
    requests_per_level: int | None = None
    duration_s: float | None = None
    warmup: int | None = None
    seed: int = 0
    max_concurrency: int = 256

    def requests_for(self, level: float) -> int | None:
        """Rows measured at ``level``; None with ``--duration`` (rows cycle until the time is up)."""
        if self.duration_s is not None:
            return None
        if self.requests_per_level is not None:
            return self.requests_per_level
        return max(MIN_REQUESTS_PER_LEVEL, math.ceil(REQUESTS_PER_SLOT * level))

    def concurrency_for(self, level: float) -> int:
        return int(level) if self.mode == "concurrency" else self.max_concurrency

    def warmup_for(self, level: float) -> int:
        """Warm-up rows before the measurement: by default one per slot (one request/s of rate), which
        opens the level's connections and lets the server reach that batch size once."""
        if self.warmup is not None:
            return self.warmup
        return min(max(1, math.ceil(level)), self.max_concurrency)


def _split(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{what}: give a comma-separated list")
    return parts


def parse_levels(text: str) -> tuple[int, ...] | None:
    """``"1,2,4,8"`` -> (1, 2, 4, 8), sorted and deduplicated; ``"auto"`` -> None."""
    if text.strip().lower() == "auto":
        return None
    out: set[int] = set()
    for p in _split(text, "--levels"):
        try:
            n = int(p)
        except ValueError:
            raise ConfigError(f"--levels {text!r}: {p!r} is not a whole number (or use 'auto')") from None
        if n < 1:
            raise ConfigError(f"--levels {text!r}: concurrency levels must be at least 1")
        out.add(n)
    return tuple(sorted(out))


def parse_rates(text: str) -> tuple[float, ...]:
    """``"0.5,1,2"`` -> (0.5, 1.0, 2.0) requests per second, sorted and deduplicated."""
    out: set[float] = set()
    for p in _split(text, "--rates"):
        try:
            x = float(p)
        except ValueError:
            raise ConfigError(f"--rates {text!r}: {p!r} is not a number") from None
        if not (x > 0 and math.isfinite(x)):
            raise ConfigError(f"--rates {text!r}: rates must be positive requests per second")
        out.add(x)
    return tuple(sorted(out))


def make_plan(*, levels: str | None, rates: str | None, requests_per_level: int | None = None,
              duration_s: float | None = None, warmup: int | None = None, seed: int = 0,
              max_concurrency: int = 256) -> SweepPlan:
    """The plan from the command line's values; ConfigError for contradictions."""
    if levels is not None and rates is not None:
        raise ConfigError("give --levels (concurrency) or --rates (arrivals per second), not both")
    if requests_per_level is not None and duration_s is not None:
        raise ConfigError("give --requests-per-level or --duration, not both")
    if requests_per_level is not None and requests_per_level < 1:
        raise ConfigError("--requests-per-level must be at least 1")
    if duration_s is not None and not duration_s > 0:
        raise ConfigError("--duration must be a positive number of seconds")
    if warmup is not None and warmup < 0:
        raise ConfigError("--warmup must be 0 or more rows")
    if max_concurrency < 1:
        raise ConfigError("--max-concurrency must be at least 1")
    common = {"requests_per_level": requests_per_level, "duration_s": duration_s, "warmup": warmup,
              "seed": seed, "max_concurrency": max_concurrency}
    if rates is not None:
        return SweepPlan(mode="rate", levels=parse_rates(rates), **common)  # type: ignore[arg-type]
    parsed = parse_levels(levels if levels is not None else "auto")
    return SweepPlan(mode="concurrency", levels=parsed, **common)  # type: ignore[arg-type]


def level_label(level: float, mode: Mode) -> str:
    return f"{level:g}/s" if mode == "rate" else f"{level:g}"


# -- rows and arrivals -----------------------------------------------------------------------------------

def cycle_rows(rows: Sequence[Row], count: int | None, *, start: int = 0) -> Iterator[Row]:
    """``count`` rows (endless for None) taken from ``rows`` in order, starting over when they run out.
    Repeats get distinct ids (``id#2`` for the second pass), so every result line is its own."""
    n = len(rows)
    i = start
    while count is None or i < start + count:
        row = rows[i % n]
        k = i // n
        yield replace(row, id=row.id if k == 0 else f"{row.id}#{k + 1}", index=i)
        i += 1


def poisson_offsets(rate: float, rand: random.Random, count: int) -> list[float]:
    """Arrival times (seconds from the first) of a Poisson process: the first at 0, then gaps drawn from
    an exponential distribution of mean 1/rate."""
    out, t = [], 0.0
    for i in range(count):
        if i:
            t += rand.expovariate(rate)
        out.append(t)
    return out


class ArrivalPacer:
    """Open-loop Poisson arrivals for ``Runner.pace``: row k is due at the first row's time plus the sum of
    k exponential gaps. Due times are absolute and never wait for completions, so a row held back because
    every slot was busy (counted in ``late``) does not push back the rows after it."""

    def __init__(self, rate: float, rand: random.Random, *, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self.rate = rate
        self.rand = rand
        self.clock = clock
        self.sleep = sleep
        self.arrivals = 0
        self.late = 0
        self._due: float | None = None

    async def __call__(self) -> None:
        now = self.clock()
        self._due = now if self._due is None else self._due + self.rand.expovariate(self.rate)
        wait = self._due - now
        if wait > 0:
            await self.sleep(wait)
        elif -wait > LATE_ARRIVAL_S:
            self.late += 1
        self.arrivals += 1


# -- figures, the knee and the auto levels (pure) -------------------------------------------------------

FIGURE_COLUMNS = (
    "level", "concurrency", "rate_per_s", "requests", "ok", "failed", "success_rate", "errors",
    "latency_mean_s", "latency_p50_s", "latency_p90_s", "latency_p95_s", "latency_p99_s",
    "requests_per_s", "ok_per_s", "output_tokens_per_s",
    "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p95_s", "ttft_p99_s",
    "tpot_mean_s", "tpot_p50_s", "tpot_p90_s", "tpot_p95_s", "tpot_p99_s", "itl_p90_s",
    "server_running_mean", "server_waiting_mean", "server_kv_cache_usage_mean", "arrivals_late", "wall_s",
)
_PCTS = ("mean", "p50", "p90", "p95", "p99")


def figures(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One level record of sweep.json as the flat row of sweep.csv (and of every table)."""
    s = rec["summary"]
    rows = s["rows"]
    server = rec.get("server") or {}
    out: dict[str, Any] = {
        "level": rec["level"], "concurrency": rec["concurrency"], "rate_per_s": rec.get("rate_per_s"),
        "requests": rows["done"], "ok": rows["ok"], "failed": rows["failed"], "success_rate": s["success_rate"],
        "errors": "; ".join(f"{k}: {v}" for k, v in sorted((rec.get("errors") or {}).items())),
    }
    for metric in ("latency", "ttft", "tpot"):
        d = s.get(f"{metric}_s") or {}
        for p in _PCTS:
            out[f"{metric}_{p}_s"] = d.get(p)
    out.update({
        "requests_per_s": s["requests_per_s"], "ok_per_s": s["ok_per_s"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "itl_p90_s": (s.get("itl_s") or {}).get("p90"),
        "server_running_mean": server.get("requests_running_mean"),
        "server_waiting_mean": server.get("requests_waiting_mean"),
        "server_kv_cache_usage_mean": server.get("kv_cache_usage_mean"),
        "arrivals_late": rec.get("arrivals_late"),
        "wall_s": s["wall_s"],
    })
    return {k: out[k] for k in FIGURE_COLUMNS}


def throughput(fig: Mapping[str, Any]) -> float:
    """The throughput the knee and ``--levels auto`` compare: successful requests per second."""
    return float(fig["ok_per_s"] or 0.0)


def disqualified(fig: Mapping[str, Any], slos: Mapping[str, float]) -> str | None:
    """Why a level cannot be recommended (failed requests, an SLO missed at p90), or None."""
    if not fig["ok"]:
        return "no request succeeded"
    if fig["failed"]:
        return f"{fig['failed']} of {fig['requests']} requests failed"
    for name, limit in sorted(slos.items()):
        value = fig.get(f"{name}_p90_s")
        if value is None:
            return f"no {name} measured (SLOs on ttft, tpot and itl need --stream)"
        if value > limit:
            return f"{name} p90 {fmt_s(value)} is above the SLO of {fmt_s(limit)}"
    return None


def find_knee(records: Sequence[Mapping[str, Any]], slos: Mapping[str, float], mode: Mode) -> dict[str, Any] | None:
    """The recommendation: the lowest level that reaches ``KNEE_SHARE`` of the best throughput among the
    qualifying levels (every request ok, every SLO met at p90). None when no level qualifies."""
    figs = sorted((figures(r) for r in records), key=lambda f: f["level"])
    fit = [f for f in figs if disqualified(f, slos) is None]
    if not fit:
        return None
    best = max(fit, key=throughput)
    knee = next(f for f in fit if throughput(f) >= KNEE_SHARE * throughput(best))
    if mode == "concurrency":
        concurrency = int(knee["concurrency"])
    else:
        # Little's law: requests in flight = arrival rate x time in the system.
        concurrency = max(1, math.ceil(throughput(knee) * float(knee["latency_mean_s"] or 0.0)))
    rec: dict[str, Any] = {
        "level": knee["level"], "concurrency": concurrency, "ok_per_s": knee["ok_per_s"],
        "output_tokens_per_s": knee["output_tokens_per_s"], "latency_p95_s": knee["latency_p95_s"],
        "best_level": best["level"], "best_ok_per_s": best["ok_per_s"],
        # False when a disqualified level (failures, SLOs) had more throughput than any qualifying one.
        "best_overall": throughput(best) >= max(throughput(f) for f in figs),
        "share_of_best": round(throughput(knee) / throughput(best), 4) if throughput(best) else None,
        "slos": dict(slos),
    }
    rec["sentence"] = recommendation_sentence(rec, mode)
    return rec


def recommendation_sentence(rec: Mapping[str, Any] | None, mode: Mode,
                            slos: Mapping[str, float] | None = None) -> str:
    """The recommendation in one sentence, for the terminal and the reports."""
    slos = rec["slos"] if rec is not None else (slos or {})
    slo_text = (" and within the SLOs (" + ", ".join(f"{k} p90 ≤ {fmt_s(v)}" for k, v in sorted(slos.items())) + ")"
                if slos else "")
    if rec is None:
        return (f"No level can be recommended: every one had failed requests{' or missed an SLO' if slos else ''} "
                f"(see the errors{' and SLOs columns' if slos else ' column'}).")
    share = f"{rec['share_of_best']:.0%}" if rec.get("share_of_best") is not None else "all"
    best_of = ("the best measured" if rec.get("best_overall", True)
               else f"the best among the levels with every request ok{' and within the SLOs' if slos else ''}")
    best = (best_of if rec["best_level"] == rec["level"]
            else f"{share} of {best_of}, {rec['best_ok_per_s']:.2f} req/s at {level_label(rec['best_level'], mode)}")
    if mode == "rate":
        return (f"Recommended rate: {rec['level']:g} requests/s, the lowest within {1 - KNEE_SHARE:.0%} of the best "
                f"throughput ({rec['ok_per_s']:.2f} req/s done, {best}), every request ok{slo_text}, p95 latency "
                f"{fmt_s(rec['latency_p95_s'])}; that is about concurrency {rec['concurrency']} (Little's law).")
    return (f"Recommended concurrency: {rec['concurrency']}, the lowest level within {1 - KNEE_SHARE:.0%} of the "
            f"best throughput ({rec['ok_per_s']:.2f} req/s, {best}; {rec['output_tokens_per_s']:.0f} output "
            f"tok/s), every request ok{slo_text}, p95 latency {fmt_s(rec['latency_p95_s'])}.")


def next_auto_level(records: Sequence[Mapping[str, Any]], ceiling: int) -> int | None:
    """``--levels auto``: the level after the last measured one (doubling), or None to stop because
    errors appeared, throughput rose by no more than ``AUTO_MIN_GAIN``, or ``ceiling`` is reached."""
    if not records:
        return min(AUTO_START, ceiling)
    figs = sorted((figures(r) for r in records), key=lambda f: f["level"])
    last = figs[-1]
    if last["failed"] or not last["ok"]:
        return None
    if len(figs) > 1 and throughput(last) <= (1 + AUTO_MIN_GAIN) * throughput(figs[-2]):
        return None
    level = int(last["level"])
    if level >= ceiling:
        return None
    return min(level * 2, ceiling)


# -- report text (pure) -----------------------------------------------------------------------------------

def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _has(figs: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(f.get(key) is not None for f in figs)


Column = tuple[str, Callable[[Mapping[str, Any]], str]]


def markdown_columns(figs: Sequence[Mapping[str, Any]], mode: Mode,
                     slos: Mapping[str, float] | None = None) -> list[Column]:
    """The Markdown table's columns: the tutorial's four (concurrency, success rate, mean latency, req/s),
    then ours; streaming and server-gauge columns only when something was measured, SLOs when given."""
    cols: list[Column] = [
        ("rate (req/s)" if mode == "rate" else "concurrency", lambda f: f"{f['level']:g}"),
        ("success rate", lambda f: _pct(f["success_rate"])),
        ("mean latency (s)", lambda f: _num(f["latency_mean_s"], 3)),
        ("req/s", lambda f: _num(f["requests_per_s"], 2)),
        ("p50 latency (s)", lambda f: _num(f["latency_p50_s"], 3)),
        ("p95 latency (s)", lambda f: _num(f["latency_p95_s"], 3)),
        ("p99 latency (s)", lambda f: _num(f["latency_p99_s"], 3)),
        ("output tok/s", lambda f: _num(f["output_tokens_per_s"], 1)),
    ]
    if _has(figs, "ttft_p50_s"):
        cols += [("TTFT p50 (s)", lambda f: _num(f["ttft_p50_s"], 3)),
                 ("TTFT p95 (s)", lambda f: _num(f["ttft_p95_s"], 3)),
                 ("TPOT p50 (ms)", lambda f: _num(f["tpot_p50_s"] * 1000 if f["tpot_p50_s"] is not None else None, 1))]
    if _has(figs, "server_running_mean"):
        cols.append(("server running", lambda f: _num(f["server_running_mean"], 1)))
    if _has(figs, "server_waiting_mean"):
        cols.append(("server waiting", lambda f: _num(f["server_waiting_mean"], 1)))
    if _has(figs, "server_kv_cache_usage_mean"):
        cols.append(("KV cache", lambda f: _pct(f["server_kv_cache_usage_mean"])))
    if mode == "rate":
        cols.append(("late arrivals", lambda f: str(f["arrivals_late"] or 0)))
    cols.append(("errors", lambda f: f["errors"] or "-"))
    if slos:
        cols.append(("SLOs", lambda f: _slo_verdict(f, slos)))
    return cols


def _slo_verdict(fig: Mapping[str, Any], slos: Mapping[str, float]) -> str:
    why = disqualified(fig, slos)
    return "met" if why is None else why if "SLO" in why else "-"


def markdown_table(doc: Mapping[str, Any]) -> str:
    """The levels as a Markdown table, the knee's level in bold."""
    figs = [figures(r) for r in doc["levels"]]
    knee = (doc.get("recommendation") or {}).get("level")
    cols = markdown_columns(figs, doc["mode"], doc["settings"].get("slos"))
    lines = ["| " + " | ".join(name for name, _ in cols) + " |",
             "|" + "|".join("---:" if i < len(cols) - 1 else "---" for i in range(len(cols))) + "|"]
    for f in figs:
        cells = [fmt(f) for _, fmt in cols]
        if f["level"] == knee:
            cells[0] = f"**{cells[0]}** (knee)"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def to_markdown(doc: Mapping[str, Any]) -> str:
    """sweep.md: what was measured, the table and the recommendation sentence."""
    st = doc["settings"]
    return "\n".join([
        f"# Sweep of {st.get('model') or 'the default model'} at {st['base_url']}", "", _settings_line(doc), "",
        markdown_table(doc), "", recommendation_sentence(doc.get("recommendation"), doc["mode"], st.get("slos")), ""])


def _settings_line(doc: Mapping[str, Any]) -> str:
    st = doc["settings"]
    per = (f"{st['duration_s']:g} s per level" if st.get("duration_s")
           else f"{st['requests_per_level']} requests per level" if st.get("requests_per_level")
           else f"{REQUESTS_PER_SLOT}x the level (at least {MIN_REQUESTS_PER_LEVEL}) requests per level")
    retries = "no retries" if st.get("max_attempts") == 1 else f"up to {st.get('max_attempts')} attempts"
    stream = "streaming" if st.get("stream") else "not streaming"
    arrivals = (f", Poisson arrivals (seed {st.get('seed')}, at most {st.get('max_concurrency')} in flight)"
                if doc["mode"] == "rate" else "")
    return (f"{per}, {retries}, {stream}{arrivals}; {st['input'].get('rows') or '?'} input rows; "
            f"throughput counts successful requests; updated {doc.get('updated_at', '?')}.")


def to_csv(doc: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIGURE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in doc["levels"]:
        w.writerow({k: ("" if v is None else v) for k, v in figures(r).items()})
    return buf.getvalue()


def format_table(doc: Mapping[str, Any]) -> Table:
    """The terminal table; the knee's row is marked."""
    mode: Mode = doc["mode"]
    figs = [figures(r) for r in doc["levels"]]
    knee = (doc.get("recommendation") or {}).get("level")
    t = Table(title=f"Sweep of {doc['settings'].get('model') or 'the default model'} at {doc['settings']['base_url']}",
              title_justify="left", box=box.SIMPLE_HEAVY)
    cols: list[Column] = [
        ("rate/s" if mode == "rate" else "concurrency", lambda f: f"{f['level']:g}"),
        ("ok", lambda f: f"{f['ok']}/{f['requests']}"),
        ("mean", lambda f: fmt_s(f["latency_mean_s"])),
        ("p50", lambda f: fmt_s(f["latency_p50_s"])),
        ("p95", lambda f: fmt_s(f["latency_p95_s"])),
        ("p99", lambda f: fmt_s(f["latency_p99_s"])),
        ("req/s", lambda f: _num(f["requests_per_s"], 2)),
        ("tok/s", lambda f: _num(f["output_tokens_per_s"], 0)),
    ]
    if _has(figs, "ttft_p50_s"):
        cols += [("TTFT p50", lambda f: fmt_s(f["ttft_p50_s"])), ("TTFT p95", lambda f: fmt_s(f["ttft_p95_s"])),
                 ("TPOT p50", lambda f: fmt_s(f["tpot_p50_s"]))]
    if _has(figs, "server_running_mean"):
        cols += [("running", lambda f: _num(f["server_running_mean"], 1)),
                 ("waiting", lambda f: _num(f["server_waiting_mean"], 1))]
    if _has(figs, "server_kv_cache_usage_mean"):
        cols.append(("KV", lambda f: _pct(f["server_kv_cache_usage_mean"])))
    if mode == "rate":
        cols.append(("late", lambda f: str(f["arrivals_late"] or 0)))
    cols.append(("errors", lambda f: f["errors"] or ""))
    slos = doc["settings"].get("slos")
    if slos:
        cols.append(("SLOs", lambda f: _slo_verdict(f, slos)))
    for i, (name, _) in enumerate(cols):
        t.add_column(name, justify="left" if name == "errors" else "right", no_wrap=i < len(cols) - 1)
    t.add_column("")
    for f in figs:
        is_knee = f["level"] == knee
        t.add_row(*[fmt(f) for _, fmt in cols], "◀ knee" if is_knee else "",
                  style="bold green" if is_knee else ("red" if f["failed"] else None))
    return t


def level_line(rec: Mapping[str, Any], mode: Mode) -> str:
    """One line after each level, so a long sweep shows its progress in logs too."""
    f = figures(rec)
    name = "rate" if mode == "rate" else "concurrency"
    parts = [f"{name} {level_label(f['level'], mode)}: {f['ok']}/{f['requests']} ok",
             f"{_num(f['requests_per_s'], 2)} req/s", f"{_num(f['output_tokens_per_s'], 0)} tok/s",
             f"latency mean {fmt_s(f['latency_mean_s'])} p95 {fmt_s(f['latency_p95_s'])}"]
    if f["ttft_p50_s"] is not None:
        parts.append(f"TTFT p50 {fmt_s(f['ttft_p50_s'])}")
    if f["server_running_mean"] is not None:
        parts.append(f"server running {f['server_running_mean']:.1f} waiting {_num(f['server_waiting_mean'], 1)}")
    if f["arrivals_late"]:
        parts.append(f"{f['arrivals_late']} arrivals waited for a free slot (raise --max-concurrency)")
    if f["errors"]:
        parts.append(f"errors: {f['errors']}")
    return ", ".join(parts)


# -- reading a sweep back ---------------------------------------------------------------------------------

def read_sweep(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / SWEEP_JSON
    try:
        doc = orjson.loads(p.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such sweep file (gptoss-batch sweep ... --report-dir DIR writes DIR/"
                          f"{SWEEP_JSON})") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{p}: not a sweep file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != SWEEP_FORMAT or not isinstance(doc.get("levels"), list):
        raise ConfigError(f"{p}: not a gptoss-batch sweep file (format {SWEEP_FORMAT})")
    return doc


def recommended_concurrency(path: str | Path) -> tuple[int, dict[str, Any]]:
    """``run --concurrency-from``: the sweep's recommended concurrency and the sweep document."""
    doc = read_sweep(path)
    rec = doc.get("recommendation")
    if not isinstance(rec, dict) or not isinstance(rec.get("concurrency"), int):
        why = recommendation_sentence(None, doc.get("mode", "concurrency"), doc["settings"].get("slos"))
        raise ConfigError(f"{path}: the sweep recommends no concurrency: {why}")
    return rec["concurrency"], doc


def concurrency_from_sweep(path: str | Path, given: str | None) -> tuple[int, str]:
    """``run --concurrency-from``: the concurrency to use and a line saying where it came from."""
    if given is not None:
        raise ConfigError("give --concurrency or --concurrency-from, not both")
    n, doc = recommended_concurrency(path)
    st = doc.get("settings") or {}
    return n, (f"Concurrency {n} from {path}: the knee of the sweep against {st.get('base_url')} "
               f"({st.get('model') or 'default model'}, updated {doc.get('updated_at', '?')}).")


# -- the report directory ---------------------------------------------------------------------------------

def sweep_settings(cfg: RunConfig, plan: SweepPlan, fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
    """What makes two sweeps comparable; a resumed sweep must match it (levels may differ)."""
    return {
        "mode": plan.mode, "base_url": cfg.base_url, "model": cfg.model, "route": cfg.route,
        "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "params": dict(cfg.params), "stream": cfg.stream, "max_attempts": cfg.retry.max_attempts,
        "requests_per_level": plan.requests_per_level, "duration_s": plan.duration_s, "warmup": plan.warmup,
        "seed": plan.seed if plan.mode == "rate" else None,
        "max_concurrency": plan.max_concurrency if plan.mode == "rate" else None,
        "slos": dict(cfg.slos),
        "input": dict(fingerprint or {}),
    }


# Settings that may change between a sweep and its resumption: they change the verdict, not the measurements.
_RESUMABLE_CHANGES = frozenset({"slos"})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_doc(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep.json document with no levels yet."""
    return {"format": SWEEP_FORMAT, "tool": f"gptoss-batch {__version__}", "mode": settings["mode"],
            "settings": dict(settings), "created_at": _now(), "runs": 0, "levels": [],
            "recommendation": None, "complete": False}


class SweepStore:
    """The report directory: ``sweep.json`` is the record of completed levels (rewritten atomically after
    each), ``levels.jsonl`` takes every result line (with ``level`` and ``run`` fields), and the CSV,
    Markdown and PNG are regenerated from the JSON. A lock keeps two sweeps out of one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.json_path = self.dir / SWEEP_JSON
        self.jsonl_path = self.dir / LEVELS_JSONL
        self.lock = OutputLock(self.jsonl_path)
        self.jsonl: JsonlSink | None = None

    def open(self, settings: Mapping[str, Any], *, overwrite: bool, console: Console) -> dict[str, Any]:
        """Take the lock and return the document to continue: the existing one (same settings) or a new one."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--report-dir {self.dir}: cannot create: {exc.strerror}") from None
        self.lock.acquire()
        try:
            doc = self._load(settings, overwrite=overwrite, console=console)
            self.jsonl = JsonlSink(self.jsonl_path)
            self.jsonl.open()
        except BaseException:
            self.lock.release()
            raise
        return doc

    def _load(self, settings: Mapping[str, Any], *, overwrite: bool, console: Console) -> dict[str, Any]:
        fresh = _new_doc(settings)
        if overwrite:
            for p in (self.json_path, self.jsonl_path):
                aside = move_aside(p)
                if aside is not None:
                    console.print(f"--overwrite: previous {p.name} kept as {aside}", highlight=False)
            return fresh
        if not self.json_path.exists():
            return fresh
        doc = read_sweep(self.json_path)
        old = doc.get("settings") or {}
        changed = sorted(k for k in set(old) | set(settings)
                         if k not in _RESUMABLE_CHANGES and old.get(k) != settings.get(k))
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed if k != "input")
            if "input" in changed:
                detail = ", ".join(x for x in (detail, "the input file changed") if x)
            raise ConfigError(f"{self.json_path} holds a sweep with other settings ({detail}); its levels cannot "
                              "be mixed with these. Use another --report-dir, or --overwrite to start afresh "
                              "(the old files are kept aside).")
        doc["settings"] = dict(settings)
        return doc

    def write_line(self, result: Result) -> None:
        if self.jsonl is not None:
            self.jsonl.write(result)

    def save(self, doc: dict[str, Any]) -> None:
        """sweep.json (atomically), then the CSV and Markdown made from it."""
        try:
            write_json_atomic(self.json_path, doc)
            _write_text_atomic(self.dir / SWEEP_CSV, to_csv(doc))
            _write_text_atomic(self.dir / SWEEP_MD, to_markdown(doc))
        except OSError as exc:
            raise OutputError(f"{self.dir}: cannot write the sweep's reports: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        self.lock.release()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_png(doc: Mapping[str, Any], path: str | Path) -> None:
    """sweep.png via plot.py; raises ``plot.PlotUnavailable`` without matplotlib."""
    from gptoss_batch import plot

    mode: Mode = doc["mode"]
    figs = sorted((figures(r) for r in doc["levels"]), key=lambda f: f["level"])
    knee = (doc.get("recommendation") or {}).get("level")
    st = doc["settings"]
    plot.write_sweep_png(
        path, levels=[float(f["level"]) for f in figs], throughput=[throughput(f) for f in figs],
        latency_p95_s=[f["latency_p95_s"] for f in figs], failed=[bool(f["failed"]) for f in figs],
        knee=float(knee) if knee is not None else None,
        x_label="arrival rate (requests/s)" if mode == "rate" else "concurrency (requests in flight)",
        title=f"Sweep of {st.get('model') or 'the default model'} at {st['base_url']}")


# -- running it -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepSpec:
    input_path: str
    input_options: InputOptions = field(default_factory=InputOptions)
    report_dir: str | None = None
    overwrite: bool = False


@dataclass
class SweepResult:
    exit_code: int
    doc: dict[str, Any]


class _LevelSink:
    """Satisfies ``runner.Sink``: tags each result with its level for the report directory's JSONL."""

    def __init__(self, store: SweepStore | None, level: float, mode: Mode) -> None:
        self.store = store
        self.tags = {"level": level, "mode": mode}

    def write(self, result: Result) -> None:
        if self.store is not None:
            self.store.write_line(replace(result, extra={**result.extra, **self.tags}))


class _Discard:
    """The warm-up's sink: its rows are not measurements."""

    def write(self, result: Result) -> None:
        return None


@dataclass
class _Control:
    """What the signal watcher acts on: the runner of the moment."""

    console: Console
    runner: Runner | None = None
    signals: list[int] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return bool(self.signals)


async def _watch_signals(control: _Control) -> None:
    """First SIGINT/SIGTERM: finish the level's in-flight requests, keep the completed levels, stop.
    Second: stop at once."""
    if sys.platform == "win32":  # pragma: no cover
        return
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        async for signum in receiver:
            control.signals.append(signum)
            name = signal.Signals(signum).name
            runner = control.runner
            control.console.print(
                f"{name}: stopping the sweep; this level is left unfinished (rerun the same command to "
                "resume at it). " + ("Press Ctrl-C again to stop at once." if len(control.signals) == 1
                                     else ""), highlight=False)
            if runner is not None:
                runner.stop(f"interrupted by {name}", interrupted=True)
                if len(control.signals) > 1:
                    runner.abort()


async def _stop_after(runner: Runner, seconds: float) -> None:
    await anyio.sleep(seconds)
    runner.stop(f"--duration {seconds:g}s reached")


@dataclass
class _Context:
    cfg: RunConfig
    plan: SweepPlan
    rows: list[Row]
    console: Console
    store: SweepStore | None
    control: _Control
    transport_factory: TransportFactory
    metrics: TextGetter | None
    metrics_url: str | None
    run_number: int
    metrics_error: str | None = None


async def _measure_level(ctx: _Context, level: float) -> dict[str, Any] | None:
    """Warm up, then measure one level; None when the sweep was interrupted during it."""
    plan, cfg = ctx.plan, ctx.cfg
    conc = plan.concurrency_for(level)
    level_cfg = replace(cfg, concurrency=conc, auto_concurrency=False, max_error_rate=None, deadline_s=None)
    n_requests = plan.requests_for(level)
    n_warm = plan.warmup_for(level)
    started_at = _now()
    async with ctx.transport_factory(level_cfg) as transport:
        if n_warm:
            warm = Runner(replace(level_cfg, concurrency=min(conc, n_warm)), transport, _Discard())
            ctx.control.runner = warm
            # Rows after the measured ones, so an input larger than a level warms up on other prompts.
            await warm.run(cycle_rows(ctx.rows, n_warm, start=n_requests or 0))
            if ctx.control.interrupted:
                return None
        builder = SummaryBuilder(slos=dict(cfg.slos), total_rows=n_requests)
        errors: Counter[str] = Counter()

        def on_result(r: Result) -> None:
            builder.add(r)
            if r.error is not None:
                errors[f"{r.error.kind} {r.error.status}" if r.error.status else r.error.kind] += 1

        sink = _LevelSink(ctx.store, level, plan.mode)
        runner = Runner(level_cfg, transport, sink, on_result=on_result, run_number=ctx.run_number)
        runner.state.total = n_requests
        pacer: ArrivalPacer | None = None
        if plan.mode == "rate":
            pacer = ArrivalPacer(level, random.Random(f"{plan.seed}/{level!r}"))
            runner.pace = pacer
        poller = (MetricsPoller(ctx.metrics, ctx.metrics_url)
                  if ctx.metrics is not None and ctx.metrics_url and ctx.metrics_error is None else None)
        display = make_display(cfg.progress, ctx.console, runner.state,
                               description=f"{plan.mode} {level_label(level, plan.mode)}")
        ctx.control.runner = runner
        display.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tick_forever, display)
                if poller is not None:
                    tg.start_soon(poller.run)
                if plan.duration_s is not None:
                    tg.start_soon(_stop_after, runner, plan.duration_s)
                outcome = await runner.run(cycle_rows(ctx.rows, n_requests))
                tg.cancel_scope.cancel()
        finally:
            display.stop()
            ctx.control.runner = None
    if outcome.output_error is not None:
        raise outcome.output_error
    if ctx.control.interrupted:
        return None
    if poller is not None and poller.error is not None and not poller.stats.polls:
        ctx.metrics_error = poller.error
        ctx.console.print(f"Server gauges unavailable ({poller.error}); the sweep goes on without them.",
                          highlight=False, soft_wrap=True)
    rec: dict[str, Any] = {
        "level": level, "concurrency": conc, "rate_per_s": level if plan.mode == "rate" else None,
        "run": ctx.run_number, "started_at": started_at, "planned_requests": n_requests,
        "warmup_requests": n_warm, "summary": builder.summary(outcome.wall_s), "errors": dict(errors),
        "server": poller.stats.summary() if poller is not None and poller.stats.polls else None,
        "stop_reason": outcome.stop_reason, "server_unreachable": outcome.unavailable,
    }
    if pacer is not None:
        rec["arrivals_late"] = pacer.late
    return rec


def _levels_to_visit(plan: SweepPlan, done: Mapping[float, dict[str, Any]]) -> Iterator[float]:
    """The plan's levels in order; with auto, the next one follows from the records so far."""
    if plan.levels is not None:
        yield from plan.levels
        return
    seen: list[dict[str, Any]] = []
    level = next_auto_level(seen, plan.max_concurrency)
    while level is not None:
        yield level
        if level not in done:
            return  # the caller measured nothing (interrupted or unreachable): stop here
        seen.append(done[level])
        level = next_auto_level(seen, plan.max_concurrency)


async def run_sweep(cfg: RunConfig, plan: SweepPlan, spec: SweepSpec, console: Console, *,
                    transport_factory: TransportFactory = default_transport,
                    metrics: TextGetter | None = None) -> SweepResult:
    """Run the sweep; ConfigError/InputError/OutputError/LockedError for run-level problems, everything
    else (failed requests included) is data in the result's document."""
    source = open_input(spec.input_path, spec.input_options)
    source.check()
    all_rows = list(source.rows())
    rows = [r for r in all_rows if r.invalid is None]
    if len(rows) < len(all_rows):
        console.print(f"{len(all_rows) - len(rows)} invalid rows left out of the sweep.", highlight=False)
    if not rows:
        raise InputError(source.name, None, "no valid rows to sweep with")
    settings = sweep_settings(cfg, plan, source.fingerprint())
    store = SweepStore(spec.report_dir) if spec.report_dir else None
    doc = (store.open(settings, overwrite=spec.overwrite, console=console) if store is not None
           else _new_doc(settings))
    try:
        return await _sweep(cfg, plan, console, store, doc, rows, transport_factory, metrics)
    finally:
        if store is not None:
            store.close()


async def _sweep(cfg: RunConfig, plan: SweepPlan, console: Console, store: SweepStore | None,
                 doc: dict[str, Any], rows: list[Row], transport_factory: TransportFactory,
                 metrics: TextGetter | None) -> SweepResult:
    doc["runs"] = int(doc.get("runs", 0)) + 1
    doc["complete"] = False
    done: dict[float, dict[str, Any]] = {float(r["level"]): r for r in doc["levels"]}
    result = SweepResult(EXIT_OK, doc)
    if done:
        console.print("Resuming the sweep in " + str(store.dir if store else "") + ": levels "
                      + ", ".join(level_label(lv, plan.mode) for lv in sorted(done))
                      + " already measured.", highlight=False, soft_wrap=True)
    control = _Control(console=console)
    metrics_url = (cfg.metrics_url or metrics_url_for(cfg.base_url)) if cfg.server_metrics else None
    own_metrics = None
    if metrics is None and metrics_url:
        from gptoss_batch.transport import AiohttpTransport

        # Its own small connection pool: /metrics must not queue behind the level's busy connections.
        own_metrics = AiohttpTransport(cfg.base_url, api_key=cfg.api_key, headers=cfg.headers, limit=2)
        metrics = await own_metrics.__aenter__()
    ctx = _Context(cfg, plan, rows, console, store, control, transport_factory, metrics, metrics_url,
                   run_number=doc["runs"])
    unreachable = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, control)
            for level in _levels_to_visit(plan, done):
                if float(level) in done:
                    continue
                if control.interrupted:
                    break
                rec = await _measure_level(ctx, level)
                if rec is None:
                    break
                done[float(level)] = rec
                doc["levels"] = [done[k] for k in sorted(done)]
                doc["recommendation"] = find_knee(doc["levels"], cfg.slos, plan.mode)
                doc["updated_at"] = _now()
                if store is not None:
                    store.save(doc)
                console.print(level_line(rec, plan.mode), highlight=False, soft_wrap=True)
                if rec["server_unreachable"]:
                    unreachable = True
                    why = escape(str(rec["stop_reason"]))
                    console.print(f"[yellow]The server is unreachable:[/] {why}; the sweep stops "
                                  "here (rerun the same command to resume).", highlight=False, soft_wrap=True)
                    break
            else:
                doc["complete"] = True
            tg.cancel_scope.cancel()
    finally:
        if own_metrics is not None:
            await own_metrics.__aexit__(None, None, None)
    doc["levels"] = [done[k] for k in sorted(done)]
    doc["recommendation"] = find_knee(doc["levels"], cfg.slos, plan.mode)
    doc["updated_at"] = _now()
    written = [SWEEP_JSON, SWEEP_CSV, SWEEP_MD, LEVELS_JSONL]
    png_note = None
    if store is not None:
        store.save(doc)
        if doc["levels"]:
            try:
                write_png(doc, store.dir / SWEEP_PNG)
                written.insert(3, SWEEP_PNG)
            except ImportError as exc:
                png_note = f"{SWEEP_PNG} not written: {exc}"
    if doc["levels"] and console.is_terminal:
        console.print(format_table(doc))
    elif doc["levels"]:
        # Logs and CI get the Markdown table: whole lines, never columns squeezed to 80 characters.
        console.print(markdown_table(doc), highlight=False, soft_wrap=True, markup=False)
    console.print(recommendation_sentence(doc["recommendation"], plan.mode, cfg.slos), highlight=False,
                  soft_wrap=True)
    if store is not None:
        console.print(f"Reports: {store.dir}/{{{','.join(written)}}}", highlight=False, soft_wrap=True)
        if png_note:
            console.print(png_note, highlight=False, soft_wrap=True, markup=False)  # keeps [plot]
    if control.interrupted:
        result.exit_code = EXIT_SIGTERM if control.signals[0] == signal.SIGTERM else EXIT_SIGINT
    elif unreachable or doc["recommendation"] is None:
        result.exit_code = EXIT_FAILED
    return result
