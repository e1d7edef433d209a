r"""The accelerator benchmark: the paper-size configs of every model in bf16, XLA against cuDNN
attention, in about 8 minutes on one H100/H200. Run it as ``benchmarks/gpu.sh``.

    benchmarks/gpu.sh [--budget_s=450] [--only=vit,tokenizer] [--out=benchmarks/results.jsonl]
                      [--results_md=benchmarks/RESULTS.md]
    benchmarks/gpu.sh --smoke      # the same code on CPU with tiny configs (CI)

Per entry of :data:`PLAN` (a ``benchmarks.run`` config, a batch size, an attention
implementation) one child process runs :func:`benchmarks.run.bench_config` with
``config.model.dtype = 'bfloat16'`` and that ``config.model.attention``: compile time, the
training step (median of timed blocks, no host synchronisation inside a block), its FLOPs (XLA's
count of the same step with materialised attention, :func:`benchmarks.run.loop_free_flops`: a
cuDNN custom call counts as no FLOPs) and MFU against the bf16 peak of
:data:`benchmarks.flops.PEAK_FLOPS`, the compiled step's peak
memory and the device's own peak (``memory_stats``), forward / backward / optimiser shares
(first attention variant of a model only: two more compilations), predict spectra/s, and the
input pipeline. A child per entry keeps one config's memory, compilation cache or crash (a
kernel the cuDNN version rejects) from touching the next; a failure is recorded as a row with
``status = 'failed: ...'``. Entries run in priority order (the MFU goals of issue 16 first:
ViT-B/16 and the tokenizer 'paper'); once ``--budget_s`` is spent the rest are recorded as
skipped, so the script ends in time on a slower machine.

Rows go to ``--out`` (JSON lines, with ``gpu_run`` naming the run) and a dated section to
``--results_md``: per config and attention the step, spectra/s, MFU, peak memory and predict
spectra/s, and per model the cuDNN speed-up over XLA (XLA step ÷ cuDNN step).

``--smoke`` runs the same driver, children and report on the CPU with the tiny variants,
batch 2, one step, and ``'blocked'`` standing in for ``'cudnn'`` (which needs an NVIDIA GPU),
so CI catches a renamed config, field or flag before a GPU run does.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# (benchmarks.run config, global batch, attention implementations): the first implementation of
# a config also gets the forward / backward / optimiser breakdown. Batches are the configs' own
# (the papers'), except ViT-B/16 at 128 images, where an H100 reaches its matmul rate.
PLAN: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("vit_b16", 128, ("cudnn", "xla")),
    ("tokenizer_paper", 64, ("cudnn", "xla")),
    ("spectrafm_paper", 64, ("cudnn", "xla")),
    ("specpt_tokens_paper", 128, ("cudnn", "xla")),
    # The paper architecture attends over a sequence of length one: attention is immaterial.
    ("specpt_paper", 128, ("xla",)),
)
# --smoke: the same families at toy widths on CPU; 'blocked' stands in for 'cudnn'.
SMOKE_PLAN: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("vit_tiny", 2, ("blocked", "xla")),
    ("tokenizer_tiny", 2, ("blocked", "xla")),
    ("spectrafm_tiny", 2, ("blocked", "xla")),
    ("specpt_tiny", 2, ("blocked", "xla")),
)
_ROW_MARK = "GPU_BENCH_ROW "


def plan(smoke: bool, only=()) -> list[dict[str, Any]]:
    """The entries to run, in order: dicts of config, batch, attention, breakdown."""
    entries = []
    for config, batch, attentions in (SMOKE_PLAN if smoke else PLAN):
        if only and not any(o in config for o in only):
            continue
        for i, attention in enumerate(attentions):
            entries.append({"config": config, "batch": batch, "attention": attention,
                            "breakdown": i == 0 and not smoke})
    return entries


# ==============================================================================================
# One entry (child process)
# ==============================================================================================
def run_one(spec: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """bench_config for one entry of :func:`plan`, bf16, with the device's peak memory."""
    import jax

    from benchmarks import run

    steps, reps = (1, 1) if smoke else (10, 3)
    row = run.bench_config(
        spec["config"], steps=steps, reps=reps, batch=spec["batch"],
        threads=("1",) if smoke else ("4",), pipeline_batches=1 if smoke else 10,
        n_train=32 if smoke else max(512, 13 * spec["batch"]), breakdown=spec["breakdown"],
        model_overrides={"dtype": "bfloat16", "attention": spec["attention"]},
        log=lambda *a: print(*a, file=sys.stderr, flush=True))
    stats = jax.devices()[0].memory_stats() or {}
    row["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    row["status"] = "ok"
    return row


# ==============================================================================================
# The driver
# ==============================================================================================
def _child(spec, smoke: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--one=" + json.dumps(spec)]
    if smoke:
        cmd.append("--smoke")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"failed: timed out after {timeout:.0f} s"}
    rows = [l[len(_ROW_MARK):] for l in res.stdout.splitlines() if l.startswith(_ROW_MARK)]
    if res.returncode != 0 or not rows:
        tail = [l for l in res.stderr.strip().splitlines() if l.strip()][-3:]
        return {**spec, "status": "failed: " + (" | ".join(tail)[-400:] or
                                                f"exit code {res.returncode}")}
    row = json.loads(rows[-1])
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def run_plan(smoke: bool = False, only=(), budget_s: float = 450.0, out: str | None = None,
             results_md: str | None = None, command: str = "benchmarks/gpu.sh",
             log=print) -> list[dict[str, Any]]:
    """Runs every entry of :func:`plan` in its own process within ``budget_s`` seconds; writes
    the rows to ``out`` and a section to ``results_md`` (when given); returns the rows."""
    from benchmarks import run

    entries = plan(smoke, only)
    if not entries:
        raise ValueError(f"--only={','.join(only)} matches no config of the plan")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    rows = []
    for spec in entries:
        left = budget_s - (time.perf_counter() - t0)
        if left < (5 if smoke else 30):
            row = {**spec, "status": f"skipped: the {budget_s:.0f} s budget was spent"}
        else:
            log(f"[gpu] {spec['config']} batch {spec['batch']} attention {spec['attention']} "
                f"({left:.0f} s left)")
            row = _child(spec, smoke, left)
        row.update(gpu_run=stamp, smoke=smoke, attention_requested=spec["attention"])
        rows.append(row)
        log(f"[gpu]   {row['status']}" + (f": step {row['step_ms']} ms, MFU {row.get('mfu')}"
                                          if row["status"] == "ok" else ""))
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if results_md:
        host = next((r["host"] for r in rows if r.get("host")), platform.node())
        run.update_results_md(Path(results_md), markdown(rows, command),
                              f"gpu {stamp[:10]} {host}{' smoke' if smoke else ''}")
    return rows


def _fmt(x, spec=",.1f", none="n/a"):
    return none if x is None else format(x, spec)


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    """The RESULTS.md section of one run of :func:`run_plan`."""
    ok = [r for r in rows if r["status"] == "ok"]
    head = ok[0] if ok else {}
    lines = [f"## {rows[0]['gpu_run'][:10]} — `{command}`", ""]
    if head:
        lines.append(f"{head['host']}: {head['devices']} × {head['device_kind']} "
                     f"({head['platform']}), jax {head['jax']}, bf16 compute (float32 "
                     "parameters, optimiser state and losses). Step = median of timed blocks; "
                     "MFU = XLA's FLOP count of the step ÷ step time ÷ the device's dense bf16 "
                     "peak; peak memory: the compiled step's (arguments + outputs + "
                     "temporaries − aliased) and the device's peak in use during the run."
                     + (" Smoke run: CPU, toy widths, 'blocked' standing in for 'cudnn'."
                        if rows[0].get("smoke") else ""))
        lines.append("")
    lines += ["| config | batch | attention | step ms (fwd / bwd / opt) | train spectra/s | "
              "TFLOP/s | MFU | peak MiB (compiled / device) | predict spectra/s | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['batch']} | {r['attention']} | | | | | | | "
                         f"{r['status']} |")
            continue
        bd = (f" ({_fmt(r['fwd_ms'], '.0f')} / {_fmt(r['bwd_ms'], '.0f')} / "
              f"{_fmt(r['optimizer_ms'], '.0f')})" if r.get("fwd_ms") is not None else "")
        dev_peak = r.get("device_peak_bytes")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['attention_requested']} | "
            f"{_fmt(r['step_ms'])}{bd} | {_fmt(r['train_spectra_per_s'])} | "
            f"{_fmt(r['achieved_flops_per_s'] and r['achieved_flops_per_s'] / 1e12, '.2f')} | "
            f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
            f"{_fmt(r['peak_bytes'] and r['peak_bytes'] / 2**20, ',.0f')} / "
            f"{_fmt(dev_peak and dev_peak / 2**20, ',.0f')} | "
            f"{_fmt(r['predict_spectra_per_s'])} | ok |")
    speedups = cudnn_speedups(rows)
    if speedups:
        lines += ["", "Fused attention speed-up per model (XLA step ÷ "
                  f"{'blocked' if rows[0].get('smoke') else 'cuDNN'} step): "
                  + ", ".join(f"{k} {v:.2f}×" for k, v in speedups.items()) + "."]
    return "\n".join(lines) + "\n"


def cudnn_speedups(rows) -> dict[str, float]:
    """{config: XLA step ÷ fused step} for the configs where both ran."""
    steps: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["status"] == "ok":
            steps.setdefault(r["config"], {})[r["attention_requested"]] = r["step_ms"]
    fused = ("cudnn", "blocked")
    return {c: s["xla"] / next(s[f] for f in fused if f in s) for c, s in steps.items()
            if "xla" in s and any(f in s for f in fused)}


def main(argv):
    del argv
    from spectrax import runtime
    runtime.configure()  # XLA:CPU flag and log levels, before any computation
    from absl import flags
    f = flags.FLAGS
    if f.one:
        row = run_one(json.loads(f.one), f.smoke)
        print(_ROW_MARK + json.dumps(row), flush=True)
        return
    if not f.smoke:
        import jax
        if jax.default_backend() != "gpu":
            raise SystemExit(f"benchmarks/gpu.sh needs a GPU (jax sees {jax.devices()}); "
                             "use --smoke to check the script on a CPU")
    command = "benchmarks/gpu.sh " + " ".join(sys.argv[1:])
    rows = run_plan(f.smoke, tuple(f.only), f.budget_s, f.out or None, f.results_md or None,
                    command.strip())
    print("\n" + markdown(rows, command.strip()))
    if not any(r["status"] == "ok" for r in rows):
        raise SystemExit("no configuration ran")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_bool("smoke", False, "CPU, tiny configs, 'blocked' for 'cudnn' (CI).")
    flags.DEFINE_list("only", [], "Run only plan entries whose config contains one of these.")
    flags.DEFINE_float("budget_s", 450.0, "Stop starting entries after this many seconds.")
    flags.DEFINE_string("out", "benchmarks/results.jsonl", "JSON lines appended here.")
    flags.DEFINE_string("results_md", "benchmarks/RESULTS.md", "Markdown section added here.")
    flags.DEFINE_string("one", "", "Internal: run one plan entry (JSON) and print its row.")
    app.run(main)
