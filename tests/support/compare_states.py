#!/usr/bin/env python3
"""Compares two safetensors files of fedtune state (adapter, optimizer moments) value by value.

  compare_states.py A B LABEL [TOL]   exits non-zero unless both hold the same tensor names and
                                      every F32 value agrees within TOL (default 1e-6), with at
                                      least one non-zero value (an empty or all-zero state fails).
Used by the shell tests that compare runs (tests/cli/*.sh).
"""
import json
import struct
import sys


def load(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    base = 8 + n
    header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        lo, hi = t["data_offsets"]
        out[name] = struct.unpack(f"<{(hi - lo) // 4}f", b[base + lo:base + hi]) if t["dtype"] == "F32" else None
    return out


def main():
    a, b, label = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
    tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-6
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])
    f32 = [k for k in a if a[k] is not None]
    worst = max(abs(x - y) for k in f32 for x, y in zip(a[k], b[k]))
    scale = max(abs(x) for k in f32 for x in a[k])
    print(f"{label}: max |diff| {worst:.3g} over {len(f32)} tensors (max |value| {scale:.3g})")
    assert scale > 0 and worst <= tol, f"{label}: differs"


if __name__ == "__main__":
    main()
