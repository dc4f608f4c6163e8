"""`flashseek bench <family>`: measures the ceilings, runs a family's cases and its peers in the same
run, prints a table (µs, TB/s, TFLOP/s, % of each ceiling, speed-up over the peer), writes JSON and
optionally a roofline PNG."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import subprocess
import traceback
from pathlib import Path

import torch

from flashseek.bench.common import BenchContext, Row, measure_ceilings

# family -> (module, function)
FAMILIES = {
    "quant": ("flashseek.bench.gemm", "run_quant"),
    "gemm": ("flashseek.bench.gemm", "run_gemm"),
    "grouped": ("flashseek.bench.gemm", "run_grouped"),
    "routing": ("flashseek.bench.routing", "run_routing"),
    "moe": ("flashseek.bench.moe", "run_moe"),
    "mla": ("flashseek.bench.mla", "run"),
    "model": ("flashseek.bench.model", "run_model"),
    "norm": ("flashseek.bench.norm", "run_norm"),
}


def add_parser(sub):
    p = sub.add_parser("bench", help="microbenchmarks against the ceilings and peers, measured in one run")
    p.add_argument("family", nargs="+", choices=[*FAMILIES, "all"], help="which kernel families to run")
    p.add_argument("--quick", action="store_true", help="a reduced case list")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    p.add_argument("--roofline", default=None, help="draw a roofline PNG here (needs matplotlib)")
    p.set_defaults(func=run_cli)


def _commit() -> str:
    if os.environ.get("FLASHSEEK_COMMIT"):
        return os.environ["FLASHSEEK_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[3]
        # Only this checkout's own repository: an exported tree inside another checkout would
        # otherwise report the enclosing repository's HEAD.
        top = subprocess.check_output(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                                      stderr=subprocess.DEVNULL, text=True).strip()
        if Path(top).resolve() != root:
            return "unknown"
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def run_families(families, device: torch.device, quick: bool) -> tuple[dict, list[Row]]:
    import flashseek  # noqa: F401  (registers the ops)

    ctx = BenchContext(device, quick=quick)
    ctx.ceilings = measure_ceilings(device, quick=quick)
    rows: list[Row] = []
    errors: dict[str, str] = {}
    for fam in families:
        mod_name, fn_name = FAMILIES[fam]
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name:
                raise
            print(f"[bench] family {fam!r} has no benchmark module yet ({mod_name})")
            continue
        try:
            rows += getattr(mod, fn_name)(ctx)
        except Exception:
            # One family's failure must not discard the rows the others measured in this run.
            errors[fam] = traceback.format_exc()
            print(f"[bench] family {fam!r} FAILED:\n{errors[fam]}", flush=True)
    ctx.ceilings["errors"] = errors
    return ctx.ceilings, rows


def format_table(ceilings: dict, rows: list[Row]) -> str:
    lines = [
        f"device: {ceilings.get('device')}  copy {ceilings.get('copy_tbps', 0):.2f} TB/s  "
        f"bf16 {ceilings.get('bf16_tflops') or 0:.0f} TFLOP/s  fp8 {ceilings.get('fp8_tflops') or 0:.0f} TFLOP/s "
        "(measured in this run)",
        f"{'family':<8} {'case':<44} {'backend':<9} {'us':>9} {'TB/s':>6} {'%bw':>5} {'TFLOP/s':>8} "
        f"{'%peak':>6} {'peer':<16} {'peer us':>9} {'x peer':>6}",
    ]
    for r in rows:
        d = r.to_dict(ceilings)
        pct_bw = f"{d['pct_copy_bw']:.0f}" if d["pct_copy_bw"] is not None else "-"
        pct_pk = f"{d['pct_peak']:.0f}" if d["pct_peak"] is not None else "-"
        peer_us = f"{r.peer_us:.1f}" if r.peer_us else "-"
        spd = f"{d['speedup_vs_peer']:.2f}" if d["speedup_vs_peer"] else "-"
        lines.append(
            f"{r.family:<8} {r.case[:44]:<44} {r.backend:<9} {r.us:>9.1f} {r.tbps:>6.2f} {pct_bw:>5} "
            f"{r.tflops:>8.1f} {pct_pk:>6} {(r.peer or '-')[:16]:<16} {peer_us:>9} {spd:>6}")
    return "\n".join(lines)


def write_json(path: str, ceilings: dict, rows: list[Row], families) -> None:
    doc = {
        "card": ceilings.get("device"),
        "commit": _commit(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "families": list(families),
        "ceilings": ceilings,
        "rows": [r.to_dict(ceilings) for r in rows],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def draw_roofline(path: str, ceilings: dict, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = ceilings["copy_tbps"]
    peak = ceilings.get("fp8_tflops") or ceilings.get("bf16_tflops")
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [10 ** (i / 10) for i in range(-10, 41)]
    ax.plot(xs, [min(bw * x, peak) for x in xs], "k-", label=f"roof: {bw:.2f} TB/s, {peak:.0f} TFLOP/s")
    for r in rows:
        if r.flops <= 0 or r.bytes <= 0:
            continue
        ai = r.flops / r.bytes
        ax.scatter([ai], [r.tflops], s=18)
        ax.annotate(f"{r.family}:{r.case[:18]}", (ai, r.tflops), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"flashseek roofline on {ceilings.get('device')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def run_cli(args) -> int:
    families = list(FAMILIES) if "all" in args.family else args.family
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ceilings, rows = run_families(families, device, args.quick)
    print(format_table(ceilings, rows))
    failed = sorted(ceilings.get("errors", {}))
    if args.json:
        write_json(args.json, ceilings, rows, families)
        print(f"[bench] wrote {args.json}")
    if args.roofline:
        draw_roofline(args.roofline, ceilings, rows)
        print(f"[bench] wrote {args.roofline}")
    if failed:
        print(f"[bench] families that failed: {', '.join(failed)}")
    return 1 if failed else 0
