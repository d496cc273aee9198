"""Render `mq-deploy compare --json` tables as the markdown of docs/results.md (rows x bit widths, intervals).

    python bench/ptq_tables.py docs/ptq_mamba-byte-lm.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def fmt_delta(r, lm):
    if lm:   # relative bits/byte increase, percent
        lo, hi = r["relative_ci95"]
        return f"{r['relative'] * 100:+.2f} % [{lo * 100:+.2f}, {hi * 100:+.2f}]"
    lo, hi = r["delta_ci95"]
    return f"{r['delta'] * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def render(table) -> str:
    lm = table["metric"] == "bits_per_byte"
    rows = table["rows"]
    bits = []
    for r in rows[1:]:
        if r["bits"] not in bits:
            bits.append(r["bits"])
    fp = rows[0]
    unit = "relative bits/byte change vs FP, % [95 % interval]" if lm else "top-1 change vs FP, points [95 % interval]"
    head = f"FP {fp['value']:.4f} bits/byte" if lm else f"FP {fp['value'] * 100:.2f} %"
    out = [f"{head}; {table['samples']} {'windows' if lm else 'images'}; cells: {unit}", "",
           "| recipe | " + " | ".join(b.upper() for b in bits) + " |", "|---|" + "---:|" * len(bits)]
    by = {(r["recipe"], r["bits"]): r for r in rows}
    for recipe in dict.fromkeys(r["recipe"] for r in rows[1:]):
        cells = [fmt_delta(by[(recipe, b)], lm) if (recipe, b) in by else "" for b in bits]
        out.append(f"| {recipe} | " + " | ".join(cells) + " |")
    pairs = table.get("pairs") or []
    if pairs:
        scale, d = (1, 4) if lm else (100, 2)
        unit = "bits/byte" if lm else "points"
        better = "negative" if lm else "positive"
        plain = all((p.get("a", "mambaquant"), p.get("b", "quarot")) == ("mambaquant", "quarot") for p in pairs)
        if plain:
            out += ["", f"MambaQuant minus QuaRot ({unit}; {better} = MambaQuant better):", "",
                    "| bits | difference [95 % interval] |", "|---|---:|"]
        else:     # several pairings in one file (compare --ssm-scales): name each
            out += ["", f"Paired differences, A minus B ({unit}; {better} = A better):", "",
                    "| A minus B | bits | difference [95 % interval] |", "|---|---|---:|"]
        for p in pairs:
            lo, hi = p["diff_ci95"]
            cell = f"{p['diff'] * scale:+.{d}f} [{lo * scale:+.{d}f}, {hi * scale:+.{d}f}]"
            label = "" if plain else f"{p['a']} minus {p['b']} | "
            out.append(f"| {label}{p['bits'].upper()} | {cell} |")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(f"### {path}\n\n{render(json.load(f))}\n")
