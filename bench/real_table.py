#!/usr/bin/env python3
"""Prints issue 21's table from runs/real/<cell>-seed<N>/{metrics.csv,baselines.json}: per cell,
mean +- std over seeds.
- base / federated (all sources): ROUGE-L and per-token loss of the base model (round 0) and of
  the final federated adapter on every source's held-out examples (metrics.csv);
- alone / federated (own source): each client's own source's held-out examples, for the client
  trained alone with its own steps (local_baseline) and for the final federated adapter,
  averaged over clients; "better off" = share of clients whose ROUGE-L is higher federated;
- centralized: the pooled data, the federation's total steps (centralized_baseline);
- MiB up per round: what the clients uploaded (compressed where the cell compresses)."""
import csv, json, os, re, statistics, sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
root = args[0] if args else "runs/real"
nan = float("nan")
cells = {}
for d in sorted(os.listdir(root)):
    m = re.fullmatch(r"(.+)-seed(\d+)", d)
    if not m or not os.path.exists(os.path.join(root, d + ".done")) and not os.path.exists(os.path.join(root, d, "baselines.json")):
        continue
    with open(os.path.join(root, d, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        continue
    num = lambda r, k: float(r[k]) if r.get(k) not in (None, "") else nan
    row = {"base rouge": num(rows[0], "rouge_l"), "base loss": num(rows[0], "eval_loss"),
           "fed rouge": num(rows[-1], "rouge_l"), "fed loss": num(rows[-1], "eval_loss")}
    ups = [float(r["bytes_up"]) for r in rows[1:] if r.get("bytes_up")]
    row["MiB up"] = statistics.mean(ups) / 2**20 if ups else nan
    path = os.path.join(root, d, "baselines.json")
    if os.path.exists(path):
        with open(path) as f:
            b = json.load(f)
        local = [c for c in b.get("local", []) if "federated" in c]
        if local:
            row["alone rouge"] = statistics.mean(c.get("rouge_l", nan) for c in local)
            row["fed own rouge"] = statistics.mean(c["federated"].get("rouge_l", nan) for c in local)
            row["alone loss"] = statistics.mean(c.get("loss", nan) for c in local)
            row["fed own loss"] = statistics.mean(c["federated"].get("loss", nan) for c in local)
            row["better off"] = sum(c["federated"].get("rouge_l", nan) > c.get("rouge_l", nan) for c in local) / len(local)
        if "centralized" in b:
            row["central rouge"] = b["centralized"].get("rouge_l", nan)
    cells.setdefault(m.group(1), []).append(row)


def fmt(vals, pct=False, digits=3):
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    k = 100 if pct else 1
    mean = statistics.mean(vals) * k
    sd = statistics.stdev(vals) * k if len(vals) > 1 else 0.0
    return f"{mean:.0f}% ± {sd:.0f}" if pct else f"{mean:.{digits}f} ± {sd:.{digits}f}"


cols = [("base rouge", "base model ROUGE-L"), ("fed rouge", "federated ROUGE-L"), ("fed loss", "federated loss"),
        ("alone rouge", "alone: own-source ROUGE-L"), ("fed own rouge", "federated: own-source ROUGE-L"),
        ("alone loss", "alone: own-source loss"), ("fed own loss", "federated: own-source loss"),
        ("better off", "clients better off federated"), ("central rouge", "centralized ROUGE-L"), ("MiB up", "MiB up per round")]
if "--short" in sys.argv:  # the README's columns
    cols = [c for c in cols if c[0] in ("base rouge", "fed rouge", "alone rouge", "fed own rouge", "central rouge", "MiB up")]
print("| cell | seeds | " + " | ".join(h for _, h in cols) + " |")
print("|---|---|" + "---|" * len(cols))
for cell, rows in cells.items():
    print(f"| {cell} | {len(rows)} | " + " | ".join(
        fmt([r.get(k, nan) for r in rows], pct=(k == "better off"), digits=(1 if k == "MiB up" else 3)) for k, _ in cols) + " |")
