#!/usr/bin/env python3
"""Markdown table from bench/run_lowbit_table.sh's logs (runs/lowbit/<type>-<method>.log)."""
import os, re, sys

d = sys.argv[1] if len(sys.argv) > 1 else "runs/lowbit"


def finetune_table(task):
    """Mean +- std over seeds of held-out loss and exact match after fine-tuning, per cell."""
    import statistics
    cells = {}
    for name in sorted(os.listdir(d)):
        m = re.match(rf"ft-{re.escape(task)}-(\w+)-(\w+)-seed(\d+)\.log$", name)
        if not m:
            continue
        text = open(os.path.join(d, name)).read()
        after = re.search(r"\[after\] held-out loss ([0-9.]+).*?exact match (\d+)/(\d+)", text)
        before = re.search(r"\[before\] held-out loss ([0-9.]+).*?exact match (\d+)/(\d+)", text)
        if not after:
            continue
        c = cells.setdefault((m.group(1), m.group(2)), {"loss": [], "acc": [], "base_loss": [], "base_acc": []})
        c["loss"].append(float(after.group(1)))
        c["acc"].append(100.0 * int(after.group(2)) / int(after.group(3)))
        if before:
            c["base_loss"].append(float(before.group(1)))
            c["base_acc"].append(100.0 * int(before.group(2)) / int(before.group(3)))
    def ms(v, fmt):
        if not v:
            return ""
        return (fmt % statistics.mean(v)) + (" ± " + fmt % statistics.stdev(v) if len(v) > 1 else "")
    order = {"stored": 0, "q8_0": 1, "nf4": 2, "q3_k": 3, "nf3": 4, "q2_k": 5, "nf2": 6}
    morder = {"none": 0, "svd": 1, "loftq": 2, "cloq": 3, "gptq": 4, "gptq-cloq": 5}
    print(f"| base ({task}) | correction | seeds | held-out loss before | after | exact match before | after |")
    print("|---|---|---|---|---|---|---|")
    for (typ, method), c in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 9), morder.get(kv[0][1], 9))):
        label = "Q4_1 (as stored)" if typ == "stored" else typ.upper()
        print(f"| {label} | {method} | {len(c['loss'])} | {ms(c['base_loss'], '%.3f')} | {ms(c['loss'], '%.3f')} | "
              f"{ms(c['base_acc'], '%.1f%%')} | {ms(c['acc'], '%.1f%%')} |")


if len(sys.argv) > 3 and sys.argv[2] == "--finetune":
    finetune_table(sys.argv[3])
    sys.exit(0)
rows = []
for name in sorted(os.listdir(d)):
    if not name.endswith(".log") or name.startswith("ft-"):
        continue
    text = open(os.path.join(d, name)).read()
    ppl = dict(re.findall(r"(\S+): perplexity ([0-9.]+)", text))
    gpl = next((v for k, v in ppl.items() if k.endswith("GPL-3")), None)
    perl = next((v for k, v in ppl.items() if k.endswith("perldiag.pod")), None)
    typ, method = name[:-4].split("-", 1)
    m = re.search(r"re-quantized to (\S+)(?: with \S+ rank \d+)?: ([0-9.]+) MiB -> ([0-9.]+) MiB(?: \+ ([0-9.]+) MiB correction \(([0-9.]+) s\))?", text)
    err = re.search(r"mean relative weight error ([0-9.]+) -> ([0-9.]+)(?:, on the calibration inputs ([0-9.]+) -> ([0-9.]+))?", text)
    mib = float(m.group(3)) + float(m.group(4) or 0) if m else None
    if typ == "stored":
        mib = 63.3  # SmolLM2's Q4_1 projections as stored (the q4_1 rows of `fedtune info`)
    rows.append((typ, method, gpl, perl, mib, m.group(5) if m and m.group(5) else "", err))
order = {"stored": 0, "q8_0": 1, "nf4": 2, "q3_k": 3, "nf3": 4, "q2_k": 5, "nf2": 6}
morder = {"none": 0, "svd": 1, "loftq": 2, "cloq": 3, "gptq": 4, "gptq-cloq": 5}
rows.sort(key=lambda r: (order.get(r[0], 9), morder.get(r[1], 9)))
print("| base | correction (rank 16) | projections + correction MiB | weight error (mean rel.) | GPL-3 ppl | perldiag ppl | set-up s |")
print("|---|---|---|---|---|---|---|")
for typ, method, gpl, perl, mib, secs, err in rows:
    e = ""
    if err:
        e = f"{float(err.group(1)):.3f} -> {float(err.group(2)):.3f}"
        if err.group(3):
            e += f" (calibrated {float(err.group(3)):.3f} -> {float(err.group(4)):.3f})"
    label = "Q4_1 (as stored)" if typ == "stored" else typ.upper() + (" (NF3 on 576-wide rows)" if typ == "q3_k" else " (NF2 on 576-wide rows)" if typ == "q2_k" else "")
    print(f"| {label} | {method} | {mib:.1f} | {e} | {gpl} | {perl} | {secs} |" if mib else f"| {label} | {method} | ? | {e} | {gpl} | {perl} | {secs} |")
