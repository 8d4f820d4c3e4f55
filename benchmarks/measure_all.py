"""Re-measure every time and throughput the README states, one after another, with the conditions.

    python benchmarks/measure_all.py                      # everything (~2 h 35 min on 2 CPU cores)
    python benchmarks/measure_all.py --only throughput stf_cost
    python benchmarks/measure_all.py --list

Each benchmark runs as its own process, alone: before starting one the runner waits (up to
``--settle`` seconds) until the 1-minute load average is below ``--max-load``, so a neighbour's
burst or the previous benchmark's tail does not leak into the next. For each it records the date,
the CPU model, the core count, torch's thread count, the load average before and after, the wall
time and the full output, in ``--out/<name>.log``; ``--out/conditions.md`` is the table of
conditions the README quotes. A benchmark that fails is reported and the rest still run; the exit
code is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

# name -> command line, exactly as the README quotes it (run from the repository root).
BENCHMARKS: dict[str, list[str]] = {
    # Several interleaved rounds each: on the shared 2-core VMs one round can run 25% slower than the next.
    "throughput": [PY, "benchmarks/throughput.py", "--steps", "60", "--rounds", "5"],
    "ema_cost": [PY, "benchmarks/ema_cost.py", "--rounds", "5"],
    "stf_cost": [PY, "benchmarks/stf_cost.py", "--repeats", "30"],
    "timestep_samplers": [PY, "benchmarks/timestep_samplers.py", "--rounds", "4"],
    "networks": [PY, "benchmarks/networks.py", "--iters", "5", "--rounds", "3"],
    "quickstart": ["lightning-diffusion", "fit", "--config", "configs/quickstart.yaml",
                   "--trainer.default_root_dir=outputs/measure_quickstart"],
    "flow": ["lightning-diffusion", "fit", "--config", "configs/flow.yaml",
             "--trainer.default_root_dir=outputs/measure_flow"],
    "mixture": ["lightning-diffusion", "fit", "--config", "configs/mixture.yaml",
                "--trainer.default_root_dir=outputs/measure_mixture"],
    "stf_variance": [PY, "benchmarks/stf_variance.py"],
    "latents": [PY, "benchmarks/latents.py"],
    "fsdp_memory": [PY, "benchmarks/fsdp_memory.py", "--world-sizes", "8", "64", "--rounds", "3"],
    "latent_digits": ["lightning-diffusion", "fit", "--config", "configs/latent_digits.yaml",
                      "--trainer.default_root_dir=outputs/measure_latent_digits",
                      "--data.init_args.path=outputs/measure_latent_digits/latents"],  # encodes on first use: timed too
    "convergence_quick": [PY, "benchmarks/convergence.py", "--quick", "--out", "outputs/convergence_quick"],
    "convergence_mixture": [PY, "benchmarks/convergence.py", "--out", "benchmarks/results/convergence_mixture"],
    "convergence": [PY, "benchmarks/convergence.py", "--data", "digits", "--out", "benchmarks/results/convergence"],
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def settle(max_load: float, limit: float) -> float:
    """Wait until the 1-minute load average drops below ``max_load`` (at most ``limit`` s); return it."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def write_conditions(path: Path, machine: str, rows: list[str]) -> str:
    """Merge this sitting's rows into ``path``: a re-measured benchmark's row is replaced, the others kept."""
    kept = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| ") and cells[0] in BENCHMARKS:
                kept[cells[0]] = line
    for row in rows:
        kept[row.split("|")[1].strip()] = row
    table = ("| benchmark | command | started | wall time | load before | load after | result |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(kept[n] for n in BENCHMARKS if n in kept))
    path.write_text(f"Machine: {machine}.\nEach benchmark ran alone (no other job; the runner waited for the "
                    "1-minute load average to fall below 0.5 before each); rows of different sittings keep "
                    f"their own date.\n\n{table}\n")
    return table


def torch_threads() -> str:
    out = subprocess.run([PY, "-c", "import torch; print(torch.get_num_threads(), torch.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these only")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    p.add_argument("--max-load", type=float, default=0.5, help="start a benchmark below this 1-minute load")
    p.add_argument("--settle", type=float, default=180.0, help="longest wait for the load to settle (s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "measured"))
    args = p.parse_args()
    names = args.only or list(BENCHMARKS)
    if args.list:
        for name in names:
            print(f"{name:18} {' '.join(BENCHMARKS[name])}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads, torch_version = torch_threads().split()
    machine = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch_version} with {threads} threads, no GPU used"
    rows, failed = [], []
    for name in names:
        load_before = settle(args.max_load, args.settle)
        started = time.perf_counter()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"[{stamp}] {name}: {' '.join(BENCHMARKS[name])} (load {load_before:.2f})", flush=True)
        proc = subprocess.run(BENCHMARKS[name], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        header = (f"# {name}\n# command: {' '.join(BENCHMARKS[name])}\n# date: {stamp}\n# machine: {machine}\n"
                  f"# load average (1 min) before {load_before:.2f}, after {load_after:.2f}\n"
                  f"# wall time {seconds:.0f} s, exit code {proc.returncode}\n\n")
        (out / f"{name}.log").write_text(header + proc.stdout + ("\n# stderr tail\n" + proc.stderr[-4000:]
                                                                  if proc.returncode else ""))
        if proc.returncode:
            failed.append(name)
        rows.append(f"| {name} | `{' '.join(BENCHMARKS[name]).replace(PY, 'python')}` | {stamp} | "
                    f"{seconds / 60:.1f} min | {load_before:.2f} | {load_after:.2f} | "
                    f"{'ok' if proc.returncode == 0 else f'failed ({proc.returncode})'} |")
        print(f"    {seconds:.0f} s, exit {proc.returncode}", flush=True)
    table = write_conditions(out / "conditions.md", machine, rows)
    print(f"\n{table}\nwrote {out}")
    if failed:
        print(f"failed: {', '.join(failed)} (see their logs)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
