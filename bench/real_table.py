#!/usr/bin/env python3
"""Prints issue 21's table from runs/real/<cell>-seed<N>/{baselines.json,metrics.csv}: per cell,
mean +- std over seeds. "alone" and "federated": each client's own tasks' held-out examples
(weighted by its task shares), averaged over clients, for the client trained alone with its own
steps (local_baseline) and the final federated adapter; "federated, all tasks" and
"centralized": every task once (centralized_baseline). Loss is the mean of per-task per-token
losses."""
import csv, json, os, re, statistics, sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/real"
cells = {}
for d in sorted(os.listdir(root)):
    m = re.fullmatch(r"(.+)-seed(\d+)", d)
    path = os.path.join(root, d, "baselines.json")
    if not m or not os.path.exists(path):
        continue
    with open(path) as f:
        b = json.load(f)
    with open(os.path.join(root, d, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    row = {}
    nan = float("nan")
    local = [c for c in b.get("local", []) if "federated" in c]
    for metric in ("rouge_l", "accuracy", "loss"):
        if local:
            row[f"alone {metric}"] = statistics.mean(c.get(metric, nan) for c in local)
            row[f"federated {metric}"] = statistics.mean(c["federated"].get(metric, nan) for c in local)
            row[f"clients better federated {metric}"] = sum(
                (c["federated"].get(metric, nan) < c.get(metric, nan)) if metric == "loss"
                else (c["federated"].get(metric, nan) > c.get(metric, nan)) for c in local) / len(local)
        if "centralized" in b:  # every task once, beside the federated adapter weighted the same way
            row[f"centralized {metric}"] = b["centralized"].get(metric, nan)
            row[f"federated, all tasks {metric}"] = b.get("federated", {}).get(metric, nan)
    row["before rouge_l"] = float(rows[0].get("rouge_l") or "nan") if rows else nan
    ups = [float(r["bytes_up"]) for r in rows[1:] if r.get("bytes_up")]
    row["MiB up per round"] = statistics.mean(ups) / 2**20 if ups else nan
    cells.setdefault(m.group(1), []).append(row)


def fmt(vals, pct=False):
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    k = 100 if pct else 1
    mean = statistics.mean(vals) * k
    sd = statistics.stdev(vals) * k if len(vals) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"


cols = [("before rouge_l", False), ("alone rouge_l", False), ("federated rouge_l", False), ("alone loss", False), ("federated loss", False),
        ("clients better federated rouge_l", True), ("federated, all tasks rouge_l", False), ("centralized rouge_l", False),
        ("federated, all tasks loss", False), ("centralized loss", False), ("alone accuracy", True), ("federated accuracy", True),
        ("MiB up per round", False)]
print("| cell | seeds | " + " | ".join(c.replace("accuracy", "exact %").replace("clients better federated rouge_l", "% clients better off federated (ROUGE-L)").replace("before", "base model") for c, _ in cols) + " |")
print("|---|---|" + "---|" * len(cols))
for cell, rows in cells.items():
    print(f"| {cell} | {len(rows)} | " + " | ".join(fmt([r.get(c, float('nan')) for r in rows], pct) for c, pct in cols) + " |")
