#!/usr/bin/env python3
"""Prints the README results table from runs/table/<cell>/metrics.csv (+ ledger for centralized)."""
import csv, os, sqlite3, sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/table"
rows = []
for cell in sorted(os.listdir(root)):
    path = os.path.join(root, cell, "metrics.csv")
    if not os.path.exists(path):
        continue
    with open(path) as f:
        recs = list(csv.DictReader(f))
    first, last = recs[0], recs[-1]
    eps = last.get("epsilon") or "inf"
    central = ""
    try:
        db = sqlite3.connect(os.path.join(root, cell, "ledger.sqlite"))
        r = db.execute("SELECT value FROM run WHERE key='centralized_accuracy'").fetchone()
        if r:
            central = f"{100 * float(r[0]):.1f}%"
    except sqlite3.Error:
        pass
    per_task = ", ".join(f"{k[4:]} {100 * float(v):.0f}%" for k, v in last.items() if k.startswith("acc_") and v)
    rows.append((cell, f"{100 * float(first['accuracy']):.1f}%", f"{100 * float(last['accuracy']):.1f}%", per_task,
                 f"{float(last['eval_loss']):.4f}", eps if eps == "inf" else f"{float(eps):.2f}",
                 f"{sum(float(r['bytes_up'] or 0) for r in recs) / 2**20:.1f}", central))
print("| cell | accuracy before | after | per task (after) | eval loss | epsilon | MiB up (all rounds) | centralized, same budget |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
