"""Recommendation quality over seeds, through the CLI exactly as a user runs it, and one table.

    python benchmarks/quality_table.py --data ../shared/data/amazon-sports/sequences.txt --seeds 0 1 2 \\
        --out runs/quality/sports [--parallel 3] [--tiger sports] [-- extra train flags]

For every seed: ``onerec-fast train --data D --seed S --out OUT/seedS`` then ``onerec-fast evaluate --checkpoint
OUT/seedS --out OUT/seedS/eval.json`` (OneRec from the run's best.pt, the SASRec-style baseline trained with the
same seed and early stopping on the same validation split, popularity), each seed's pair in its own process
(``--parallel`` at once: on one GPU the small models leave it mostly idle; on a CPU keep 1). Prints, and writes to
``OUT/quality.md``, the mean +- std over seeds of Recall/NDCG@5/10 per method, each run's wall time, and
TIGER's published numbers when ``--tiger`` names a dataset it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# TIGER (Rajput et al., NeurIPS 2023) on the same file and protocol, as ../shared/data/amazon-sports/README.md gives it.
TIGER = {"sports": {"recall@5": 0.0264, "ndcg@5": 0.0181, "recall@10": 0.0400, "ndcg@10": 0.0225}}
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


_WARM_BASELINE = """
import sys, torch
from onerec_fast.data.sources import load_source
from onerec_fast.train.baselines import SASRecConfig
from onerec_fast.train.evaluate import sasrec_metrics
log, _ = load_source(sys.argv[1], seed=int(sys.argv[2]))
sasrec_metrics(log, SASRecConfig(seed=int(sys.argv[2])), device="cuda" if torch.cuda.is_available() else "cpu",
               show_progress=False)
"""


def run_seed(data: str, seed: int, out: Path, extra: list[str], gpu: bool) -> dict:
    """Train and evaluate one seed through the CLI; returns the evaluation JSON plus wall times."""
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "onerec_fast.cli"]
    t0 = time.perf_counter()
    # The baseline evaluate will need trains into the cache evaluate reads (same data, config, seed): meanwhile
    # on a GPU, which the small models leave mostly idle; first on a CPU, where two processes' OpenMP threads
    # slowed training 4-5x on 2 cores (ML-100K: 7.5-9.9 s per step against 1.75 s alone).
    warm = subprocess.Popen([sys.executable, "-c", _WARM_BASELINE, data, str(seed)], stdout=open(out / "baseline.log", "w"),
                            stderr=subprocess.STDOUT)
    if not gpu and warm.wait():
        raise RuntimeError(f"the baseline run failed: see {out / 'baseline.log'}")
    with open(out / "train.log", "w") as log:
        subprocess.run([*cli, "train", "--data", data, "--seed", str(seed), "--out", str(out), *extra],
                       stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if warm.wait():
        raise RuntimeError(f"the baseline run failed: see {out / 'baseline.log'}")
    t1 = time.perf_counter()
    with open(out / "evaluate.log", "w") as log:
        subprocess.run([*cli, "evaluate", "--checkpoint", str(out), "--out", str(out / "eval.json")],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    res = json.loads((out / "eval.json").read_text())
    res["train_s"], res["evaluate_s"] = t1 - t0, time.perf_counter() - t1
    return res


def table(runs: list[dict], tiger: dict | None) -> str:
    def cell(values):
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for method in ("OneRec", "SASRec", "Popularity"):
        lines.append(f"| {method} | " + " | ".join(cell([r["results"][method][m] for r in runs]) for m in METRICS) + " |")
    if tiger:
        lines.append("| TIGER (published) | " + " | ".join(f"{tiger[m]:.4f}" for m in METRICS) + " |")
    legal = min(r["results"]["OneRec"]["legality"] for r in runs)
    times = ", ".join(f"seed {r['seed']}: train {r['train_s']:.0f} s + evaluate {r['evaluate_s']:.0f} s" for r in runs)
    wins = {m: sum(r["results"]["OneRec"][m] >= r["results"]["SASRec"][m] for r in runs) for m in ("recall@10", "ndcg@10")}
    return "\n".join(lines) + (f"\n\nOneRec legality (min over seeds) {legal:.4f}; OneRec >= SASRec-style in "
                               f"{wins['recall@10']}/{len(runs)} seeds on Recall@10, {wins['ndcg@10']}/{len(runs)} on "
                               f"NDCG@10. Wall times: {times}.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True)
    p.add_argument("--parallel", type=int, default=1, help="seeds run at once")
    p.add_argument("--tiger", choices=sorted(TIGER), default=None, help="add TIGER's published row")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to onerec-fast train")
    a = p.parse_args(argv)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    out = Path(a.out)
    import torch

    gpu = torch.cuda.is_available()
    with ThreadPoolExecutor(a.parallel) as pool:
        runs = list(pool.map(lambda s: {**run_seed(a.data, s, out / f"seed{s}", extra, gpu), "seed": s}, a.seeds))
    text = (f"data {a.data}; seeds {a.seeds}; train flags {extra or '(defaults)'}\n\n"
            + table(runs, TIGER.get(a.tiger) if a.tiger else None))
    (out / "quality.md").write_text(text + "\n")
    (out / "quality.json").write_text(json.dumps(runs, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
