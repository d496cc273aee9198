"""Regenerate the figures of README.md and docs/ from the JSONs the benches wrote, or check that they agree.

    python bench/report.py            # rewrite every generated region in place
    python bench/report.py --check    # exit 1 at the first disagreement, in one line naming file and line

A generated region is text between two HTML comments (invisible in the rendered page):

    <!-- report:NAME SOURCE.json [SOURCE.json ...] [key=value ...] -->
    ... what report.py writes ...
    <!-- /report -->

Block regions have their markers on lines of their own; inline regions sit inside a line (a table cell, a
sentence). NAME is one of the renderers below (`python bench/report.py --list`), SOURCEs are paths from the
repository root (JSON files a bench script or an mq-deploy command wrote), and key=value arguments (shell
quoting) pick what to render.

--check also fails on, in README.md and every docs/**/*.md:
- a relative link, or a repository path named in the text (`docs/x.json`, `bench/y.py`, globs too), that
  does not exist; an absolute path into a home or work folder, or a DESIGN.md / STYLE.md the repository
  does not have (a document may cite only what a clone holds);
- a figure outside every region in a paragraph that cites a JSON or a bench script: a decimal number, or a
  number with a unit (%, x, ms, s, min, GiB, MiB, tok/s, ...). Such a paragraph says where its numbers come
  from, so they must be generated. Code spans, link targets and fenced blocks are not prose and are skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ptq_tables import fmt_delta  # noqa: E402  (one formatter for the PTQ cells)
from ptq_tables import render as ptq_render  # noqa: E402


class ReportError(Exception):
    """A region that cannot be rendered (missing JSON, key, bad argument): one line, with where."""


RENDERERS: dict = {}


def renderer(fn):
    RENDERERS[fn.__name__] = fn
    return fn


# ---- small helpers ---------------------------------------------------------------------------------------

def get(obj, path: str):
    """`a/b[k=v&k2=v2]/c[0]`: dict keys separated by '/', a list element by index or by equal fields."""
    cur = obj
    for part in [p for p in re.split(r"/(?![^\[]*\])", path) if p]:
        m = re.fullmatch(r"([^\[]*)((?:\[[^\]]*\])*)", part)
        key, sels = m.group(1), re.findall(r"\[([^\]]*)\]", m.group(2))
        if key:
            if not isinstance(cur, dict) or key not in cur:
                raise ReportError(f"no key {key!r} (path {path!r})")
            cur = cur[key]
        for sel in sels:
            if not isinstance(cur, list):
                raise ReportError(f"[{sel}] on a non-list (path {path!r})")
            if re.fullmatch(r"-?\d+", sel):
                try:
                    cur = cur[int(sel)]
                except IndexError:
                    raise ReportError(f"index {sel} out of range (path {path!r})") from None
                continue
            want = dict(kv.split("=", 1) for kv in sel.split("&"))
            hits = [e for e in cur if isinstance(e, dict) and all(str(e.get(k)) == v for k, v in want.items())]
            if len(hits) != 1:
                raise ReportError(f"[{sel}] matches {len(hits)} elements, not 1 (path {path!r})")
            cur = hits[0]
    return cur


def num(x, fmt: str) -> str:
    return format(x, fmt)


def signed0(x, fmt: str) -> str:
    """A signed figure that prints a zero without its sign (0.00, not +0.00 or -0.00)."""
    s = format(x, fmt)
    return s[1:] if s[:1] in "+-" and float(s.replace(",", "")) == 0 else s


def loads(obj) -> list:
    """Every 1-minute load average a JSON records: `run.load` min/max, load / load_before / load_after /
    load_at_start as a number or as os.getloadavg()'s triple (its first element)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "load" and isinstance(v, dict) and "min" in v:
                out += [v["min"], v["max"]]
            elif k.startswith("load") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(v)
            elif k.startswith("load") and isinstance(v, list) and v and isinstance(v[0], (int, float)):
                out.append(v[0])
            else:
                out += loads(v)
    elif isinstance(obj, list):
        for v in obj:
            out += loads(v)
    return out


def load_range(*objs) -> str:
    vals = [v for o in objs for v in loads(o)]
    if not vals:
        raise ReportError("the JSON records no load average")
    lo, hi = min(vals), max(vals)
    return f"{lo:.1f}" if round(lo, 1) == round(hi, 1) else f"{lo:.1f}-{hi:.1f}"


def _load_nice(d):
    """"load 6.3-8.7" and, where the bench ran at a raised priority, "at nice -10"."""
    nice = d.get("run", {}).get("nice")
    return f"load {load_range(d)}" + (f", at nice {nice}" if nice else "")


def ptq_row(table, recipe, bits):
    return get(table, f"rows[recipe={recipe}&bits={bits}]")


def is_lm(table):
    return table["metric"] == "bits_per_byte"


def span(values, fmt=".1f", sep="-"):
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}{sep}{format(hi, fmt)}"


# ---- generic ---------------------------------------------------------------------------------------------

@renderer
def value(src, path, fmt="", scale="1", suffix=""):
    """One number (or string) of the first source: path=a/b[k=v]/c, fmt (format spec), scale, suffix."""
    v = get(src[0], path)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = v * float(scale) if scale != "1" else v
        return (signed0(v, fmt) if fmt.startswith("+") else num(v, fmt)) + suffix
    return str(v) + suffix


@renderer
def ratio(src, a, b, fmt=".2f", suffix="x"):
    """value(a) / value(b) of the first source (a=path b=path)."""
    return num(get(src[0], a) / get(src[0], b), fmt) + suffix


@renderer
def load(src):
    """The 1-minute load-average range recorded anywhere in the sources."""
    return load_range(*src)


@renderer
def command(src, paths):
    """The command line that wrote the source (from its `run` record), its --json naming the source itself."""
    run = src[0].get("run")
    if not run or not run.get("bench"):
        raise ReportError(f"{paths[0]} records no command line (no 'run')")
    argv = list(run["argv"])
    if "--json" in argv and argv.index("--json") + 1 < len(argv):
        argv[argv.index("--json") + 1] = paths[0]
    argv = [a for i, a in enumerate(argv) if not (a == "--workdir" or (i and argv[i - 1] == "--workdir"))]
    nice = f"nice -n {run['nice']} " if run.get("nice") else ""
    return f"`{nice}python {run['bench']} {' '.join(shlex.quote(a) for a in argv)}`"


# ---- PTQ (mq-deploy compare --json) ----------------------------------------------------------------------

@renderer
def ptq_table(src):
    """docs/results.md's recipe x bits table with intervals (bench/ptq_tables.py's rendering)."""
    return ptq_render(src[0])


@renderer
def ptq(src, recipe, bits, what="cell", d=None):
    """One cell of a compare JSON. what: cell (change + interval), delta (signed change), abs (unsigned),
    ci (interval), value (the metric: bits/byte, or top-1 in %), paper ("91.2 (-0.5)" / "+1.99 %")."""
    t = src[0]
    r = ptq_row(t, recipe, bits)
    lm = is_lm(t)
    if what == "cell":
        return fmt_delta(r, lm)
    k = "relative" if lm else "delta"
    dd = int(d) if d is not None else 2
    unit = " %" if lm else ""
    if what == "delta":
        return num(r[k] * 100, f"+.{dd}f") + unit
    if what == "abs":
        return num(abs(r[k]) * 100, f".{dd}f") + unit
    if what == "ci":
        lo, hi = r[k + "_ci95"]
        return f"[{num(lo * 100, f'+.{dd}f')}, {num(hi * 100, f'+.{dd}f')}]"
    if what == "value":
        return num(r["value"], f".{d or 4}f") if lm else num(r["value"] * 100, f".{dd}f")
    if what == "paper":
        if lm:
            return num(r["relative"] * 100, "+.2f") + " %"
        return f"{num(r['value'] * 100, '.1f')} ({num(r['delta'] * 100, '+.1f')})"
    raise ReportError(f"ptq: what={what!r} is not one of cell, delta, abs, ci, value, paper")


def _pair(t, a, b, bits):
    """The paired difference a minus b at `bits` (a JSON without a/b fields holds MambaQuant minus QuaRot)."""
    hits = [p for p in t["pairs"] if p["bits"] == bits and (p.get("a", "mambaquant"), p.get("b", "quarot")) == (a, b)]
    if len(hits) != 1:
        raise ReportError(f"{len(hits)} pairs {a} minus {b} at {bits}, not 1")
    return hits[0]


@renderer
def ptq_pair(src, bits, what="cell", a="mambaquant", b="quarot"):
    """A minus B (default MambaQuant minus QuaRot; a=, b= pick another pairing, e.g. a=mambaquant/grouped
    b=mambaquant) of a compare JSON at `bits`: cell (diff + interval), diff, abs, ci."""
    t = src[0]
    p = _pair(t, a, b, bits)
    lm = is_lm(t)
    scale, dd = (1, 4) if lm else (100, 2)
    lo, hi = p["diff_ci95"]
    ci = f"[{num(lo * scale, f'+.{dd}f')}, {num(hi * scale, f'+.{dd}f')}]"
    if what == "cell":
        return f"{num(p['diff'] * scale, f'+.{dd}f')} {ci}"
    if what == "diff":
        return num(p["diff"] * scale, f"+.{dd}f")
    if what == "abs":
        return num(abs(p["diff"]) * scale, f".{dd}f")
    if what == "ci":
        return ci
    raise ReportError(f"ptq_pair: what={what!r} is not one of cell, diff, abs, ci")


@renderer
def ptq_span(src, recipes, bits, d="0"):
    """The range of |change vs FP| over recipes x bits of a compare JSON ("22-25" %, or points)."""
    t = src[0]
    k = "relative" if is_lm(t) else "delta"
    vals = [abs(ptq_row(t, r, b)[k]) * 100 for r in recipes.split(",") for b in bits.split(",")]
    return span(vals, f".{d}f")


@renderer
def ptq_pair_sig(src, better="a", a="mambaquant", b="quarot"):
    """The settings where A minus B (default MambaQuant minus QuaRot) is resolved in A's favour (interval clear
    of 0), or with better=b in B's favour, as "W8A8, W8A6 and W8A4", or "none"."""
    t = src[0]
    lm = is_lm(t)
    if better not in ("a", "b"):
        raise ReportError(f"ptq_pair_sig: better={better!r} is not a or b")
    a_wins = (lambda lo, hi: hi < 0) if lm else (lambda lo, hi: lo > 0)
    b_wins = (lambda lo, hi: lo > 0) if lm else (lambda lo, hi: hi < 0)
    won = a_wins if better == "a" else b_wins
    hits = [p["bits"].upper() for p in t["pairs"]
            if (p.get("a", "mambaquant"), p.get("b", "quarot")) == (a, b) and won(*p["diff_ci95"])]
    if not hits:
        return "none"
    return hits[0] if len(hits) == 1 else ", ".join(hits[:-1]) + " and " + hits[-1]


@renderer
def ptq_diff(src, recipe, bits, what="change", d=None):
    """Source 1's cell minus source 2's, same recipe and bits: what=change (relative %, or points) or value."""
    a, b = (ptq_row(t, recipe, bits) for t in src[:2])
    if what == "value":
        return num(a["value"] - b["value"], f"+.{d or 4}f")
    k = "relative" if is_lm(src[0]) else "delta"
    return num((a[k] - b[k]) * 100, f"+.{d or 2}f") + (" %" if is_lm(src[0]) else "")


@renderer
def ptq_goals(src, goals="w8a8:0.5,w4a8:2", recipe="mambaquant", a="mambaquant", b="quarot"):
    """A bullet per goal of a compare JSON: `recipe`'s loss at each bits <= its bound (relative bits/byte %,
    or top-1 points), judged on the point estimate with its interval quoted; then A >= B (default MambaQuant
    >= QuaRot) at every bit width of the pairs, naming where not, with the interval and whether it is
    resolved (clear of 0)."""
    t = src[0]
    lm = is_lm(t)
    unit, what = (" %", "bits/byte") if lm else (" points", "top-1")
    out = []
    for g in goals.split(","):
        bits, bound = g.split(":")
        r = ptq_row(t, recipe, bits)
        loss = r["relative"] * 100 if lm else -r["delta"] * 100
        ok = loss <= float(bound)
        out.append(f"- {bits.upper()} costs <= {bound}{unit} {what}: **{'met' if ok else 'missed'}**, "
                   f"{recipe} {fmt_delta(r, lm)}" + ("" if ok else f" ({loss - float(bound):.2f}{unit} over)") + ".")
    scale, dd = (1, 4) if lm else (100, 2)
    behind, ahead = [], []
    pairs = [p for p in t["pairs"] if (p.get("a", "mambaquant"), p.get("b", "quarot")) == (a, b)]
    if not pairs:
        raise ReportError(f"no pairs {a} minus {b}")
    for p in pairs:
        lo, hi = (v * scale for v in p["diff_ci95"])
        worse = p["diff"] > 0 if lm else p["diff"] < 0
        resolved = (lo > 0 if lm else hi < 0) if worse else (hi < 0 if lm else lo > 0)
        cell = f"{p['bits'].upper()} {p['diff'] * scale:+.{dd}f} [{lo:+.{dd}f}, {hi:+.{dd}f}]"
        (behind if worse else ahead).append((cell, resolved))
    head = f"- {a} >= {b} at every setting ({a} minus {b}, {what}{' ' + unit.strip() if not lm else ''}): "
    if not behind:
        out.append(head + "**met**: " + ", ".join(c for c, _ in ahead) + ".")
    else:
        out.append(head + f"**not at {len(behind)} of {len(pairs)}**: {b} is ahead at "
                   + ", ".join(f"{c} ({'resolved: interval clear of 0' if r else 'interval across 0'})"
                               for c, r in behind)
                   + (f"; {a} is ahead or equal at " + ", ".join(c for c, _ in ahead) if ahead else "") + ".")
    return "\n".join(out)


@renderer
def ptq_ladder(src, steps, bits="w8a8,w4a8,w8a6", d="2"):
    """Recipes stacked one component at a time, from one or more compare JSONs of the same model and data:
    steps="LABEL@I@RECIPE;..." (I: which source), a row per step, each cell the change vs FP with its
    interval and, after the first row, the step's own change (this row minus the row above; no interval,
    the rows may come from different runs; d: its decimals)."""
    rows = []
    for part in steps.split(";"):
        try:
            label, i, recipe = part.rsplit("@", 2)
            t = src[int(i)]
        except (ValueError, IndexError):
            raise ReportError(f"ptq_ladder: step {part!r} is not LABEL@SOURCE_INDEX@RECIPE") from None
        rows.append((label, t, recipe))
    lm = {is_lm(t) for _, t, _ in rows}
    if len(lm) != 1 or len({t["samples"] for _, t, _ in rows}) != 1:
        raise ReportError("ptq_ladder: the sources differ in metric or evaluation samples")
    lm = lm.pop()
    k, unit = ("relative", " %") if lm else ("delta", "")
    bl = bits.split(",")
    out = ["| recipe (what the step adds) | " + " | ".join(b.upper() for b in bl) + " |",
           "|---|" + "---:|" * len(bl)]
    prev = None
    for label, t, recipe in rows:
        cur = [ptq_row(t, recipe, b) for b in bl]
        cells = [fmt_delta(r, lm) + ("" if prev is None else f" (step {(r[k] - p[k]) * 100:+.{int(d)}f}{unit})")
                 for r, p in zip(cur, prev or cur)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
        prev = cur
    return "\n".join(out)


PAPER_ROWS = [   # the MambaQuant paper (ICLR 2025) and the logs in its authors' repository: cited, not measured
    ("Vim-T, ImageNet (24 layers, 197 tokens), paper", "76.1", ["37.4 (-38.7)", "37.7 (-38.4)", "59.3 (-16.8)",
                                                               "75.6 (-0.5)", "52.7 (-23.4)", "72.1 (-4.0)"]),
    ("Vim-T, authors' repo log", "76.1", ["", "", "", "75.4 (-0.7)", "", "72.1 (-4.0)"]),
    ("Vim-S, authors' repo log", "80.5", ["", "", "", "80.3 (-0.2)", "", "79.4 (-1.1)"]),
    ("Vim-B, authors' repo log", "81.9", ["", "", "", "80.1 (-1.8)", "", "79.6 (-2.3)"]),
]
PAPER_COLS = [("rtn", "w8a8"), ("smoothquant", "w8a8"), ("quarot", "w8a8"), ("mambaquant", "w8a8"),
              ("quarot", "w4a8"), ("mambaquant", "w4a8")]


@renderer
def paper_table(src):
    """The authors' figures (cited in PAPER_ROWS) beside ours from the compare JSONs (Vim, then LM)."""
    vim, lm = src
    out = ["| model | FP | W8A8 RTN | W8A8 SmoothQuant | W8A8 QuaRot | W8A8 MambaQuant | W4A8 QuaRot "
           "| W4A8 MambaQuant |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, fp, cells in PAPER_ROWS:
        out.append(f"| {label} | {fp} | " + " | ".join(cells) + " |")
    fp_v = ptq_row(vim, "fp", "fp")["value"] * 100
    out.append(f"| **ours**: Vim, Fashion-MNIST (4 layers, 17 tokens; {vim['samples']} test images) | {fp_v:.1f} | "
               + " | ".join(ptq([vim], r, b, "paper") for r, b in PAPER_COLS) + " |")
    out.append(f"| **ours**: byte LM, KJV (4 layers, 1024 tokens; bits/byte, relative) | "
               f"{ptq_row(lm, 'fp', 'fp')['value']:.4f} | " + " | ".join(ptq([lm], r, b, "paper") for r, b in PAPER_COLS)
               + " |")
    out.append(f"| **ours**: Vim at W8A4 (evaluation only) | {fp_v:.1f} | "
               + " | ".join(ptq([vim], r, "w8a4", "paper") for r in ("rtn", "smoothquant", "quarot", "mambaquant"))
               + " | | |")
    return "\n".join(out)


def _bold_min_row(rows, chosen):
    """Bold the chosen row's label and each of its cells that is strictly the smallest of its column."""
    out = []
    for label, cells, key in rows:
        fmt = []
        for j, (txt, v) in enumerate(cells):
            others = [c[j][1] for lab, c, k in rows if k != key]
            best = key == chosen and all(round(v, 6) < round(o, 6) for o in others)
            fmt.append(f"**{txt}**" if best else txt)
        out.append(f"| {'**' + label + '**' if key == chosen else label} | " + " | ".join(fmt) + " |")
    return out


OBSERVER_LABELS = {   # choose_defaults.json candidate -> the row label in docs/results.md
    "minmax": "min-max everywhere",
    "percentile 99.99 (heavy)": "percentile 99.99 (heavy) — our old default",
    "percentile 99.9999 (heavy; the authors')": "percentile 99.9999 (heavy) — the authors'",
    "mse (heavy)": "mse (heavy)",
    "mse (all)": "mse (every point)",
    "mse-out (all)": "mse-out (every point; consumer-output MSE)",
    "entropy (heavy)": "entropy (heavy; TensorRT's KL calibrator)",
}
KLT_LABELS = {"sum": "sum over layers (ours, before)", "last": "last layer (the authors')"}
SAMPLES = ("mamba-byte-lm", "vim-fashion-mnist")


def _loss_cells(per_sample):
    cells = []
    for s in SAMPLES:
        for b in ("w8a8", "w4a8"):
            v = per_sample[s][b]["loss"]
            cells.append((signed0(v, "+.3f") + " %" if s == "mamba-byte-lm" else signed0(v, "+.2f"), v))
    return cells


@renderer
def defaults_observers(src):
    """bench/choose_defaults.py: loss of every observer candidate on held-out calibration data."""
    d = src[0]
    rows = []
    for key, label in OBSERVER_LABELS.items():
        per = {s: d["observers"][s]["candidates"][key] for s in SAMPLES}
        m = d["mean_loss"][key]
        rows.append((label, _loss_cells(per) + [(num(m, ".3f"), m)], key))
    head = ["| observer (points it covers; min-max elsewhere) | LM W8A8 | LM W4A8 | Vim W8A8 | Vim W4A8 | mean loss |",
            "|---|---:|---:|---:|---:|---:|"]
    return "\n".join(head + _bold_min_row(rows, d["chosen_observer"]["label"]))


@renderer
def defaults_klt(src):
    """bench/choose_defaults.py: K from the sum over layers vs the last layer, same held-out data."""
    d = src[0]
    rows = []
    for key, label in KLT_LABELS.items():
        per = {s: d["klt"][s][key] for s in SAMPLES}
        m = d["klt_mean_loss"][key]
        rows.append((label, _loss_cells(per) + [(num(m, ".3f"), m)], key))
    head = ["| K from | LM W8A8 | LM W4A8 | Vim W8A8 | Vim W4A8 | mean loss |", "|---|---:|---:|---:|---:|---:|"]
    return "\n".join(head + _bold_min_row(rows, d["chosen_klt_source"]))


@renderer
def klt_eval_table(src):
    """MambaQuant with K from the last layer (default, sources 1 and 3) vs the sum (sources 2 and 4)."""
    lm_last, lm_sum, vim_last, vim_sum = src
    out = ["| sample | K from | W8A8 | W4A8 | W8A4 |", "|---|---|---:|---:|---:|"]
    for name, t, label in (("LM", lm_last, "last layer (default)"), ("LM", lm_sum, "sum over layers"),
                           ("Vim", vim_last, "last layer (default)"), ("Vim", vim_sum, "sum over layers")):
        cells = [fmt_delta(ptq_row(t, "mambaquant", b), is_lm(t)) for b in ("w8a8", "w4a8", "w8a4")]
        out.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


@renderer
def gptq_table(src):
    """RTN (sources 1 and 3) vs GPTQ (sources 2 and 4) weight rounding at W4, QuaRot and MambaQuant."""
    lm_rtn, lm_gptq, vim_rtn, vim_gptq = src
    out = ["| sample | recipe | W4A8 RTN | W4A8 GPTQ | W4A6 RTN | W4A6 GPTQ |", "|---|---|---:|---:|---:|---:|"]
    for name, rtn, gptq in (("LM", lm_rtn, lm_gptq), ("Vim", vim_rtn, vim_gptq)):
        for recipe in ("quarot", "mambaquant"):
            cells = [fmt_delta(ptq_row(t, recipe, b), is_lm(t)) for b in ("w4a8", "w4a6") for t in (rtn, gptq)]
            out.append(f"| {name} | {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---- mq-deploy inspect (summary.json) --------------------------------------------------------------------

@renderer
def inspect_table(src):
    """The table `mq-deploy inspect` writes as summary.md, from its summary.json."""
    lines = ["| point | view | kurtosis | max/median channel max | max/median channel variance |",
             "|---|---|---:|---:|---:|"]
    for r in src[0]["rows"]:
        lines.append(f"| {r['point']} | {r['view']} | {r['kurtosis']:.2f} | {r['max_median_channel_max']:.2f} | "
                     f"{r['max_median_channel_var']:.2f} |")
    return "\n".join(lines)


def _sig3(v):
    """Three significant figures, as docs/results.md quotes kurtosis and channel ratios (14410, 78.6, 8.98)."""
    if v >= 1000:
        return f"{v:.0f}"
    return f"{v:.{max(0, 2 - int(math.floor(math.log10(abs(v)))))}f}" if v else "0"


@renderer
def inspect_row(src, point, what):
    """One row's views of an inspect summary: what=kurtosis|max (raw / H / KLT·H / smooth+KLT·H) or var
    (raw / KLT·H)."""
    views = ("raw", "hadamard", "klt_hadamard", "smooth_rotate") if what != "var" else ("raw", "klt_hadamard")
    key = {"kurtosis": "kurtosis", "max": "max_median_channel_max", "var": "max_median_channel_var"}[what]
    return " / ".join(_sig3(get(src[0], f"rows[point={point}&view={v}]")[key]) for v in views)


INSPECT_ROWS = [(0, "Vim", "layers.2.mixer.out_proj", "out_proj input, layer 2"),
                (0, "Vim", "layers.0.mixer.in_proj", "in_proj input, layer 0"),
                (1, "LM", "layers.2.mixer.out_proj", "out_proj input, layer 2"),
                (1, "LM", "layers.0.mixer.x", "x (scan input), layer 0")]


@renderer
def inspect_summary(src):
    """docs/results.md's excerpt of the two inspect summaries (Vim first, LM second)."""
    out = ["| sample | point | kurtosis: raw / H / KLT·H / smooth+KLT·H | max/median channel max: raw / H / KLT·H / "
           "smooth+KLT·H | max/median channel variance: raw / KLT·H |", "|---|---|---|---|---|"]
    for i, sample, point, label in INSPECT_ROWS:
        cells = [inspect_row([src[i]], point, w) for w in ("kurtosis", "max", "var")]
        out.append(f"| {sample} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


@renderer
def inspect_span(src, view, what, fmt=".2f", only=""):
    """The range of one statistic at one view over the rows of INSPECT_ROWS whose point contains `only`
    (what: kurtosis, max, var)."""
    key = {"kurtosis": "kurtosis", "max": "max_median_channel_max", "var": "max_median_channel_var"}[what]
    vals = [get(src[i], f"rows[point={point}&view={view}]")[key] for i, _, point, _ in INSPECT_ROWS if only in point]
    return span(vals, fmt)


# ---- bench/scale.py --------------------------------------------------------------------------------------

def _scale_stage(runs, shape, stage):
    """The stage row of the LAST source that has it (later rounds override earlier ones) and that source."""
    found = None
    for path, run in runs:
        for row in run.get("rows", []):
            if row["shape"] != shape:
                continue
            for s in row["stages"]:
                if s["stage"] == stage:
                    found = (s, row, path)
    if found is None:
        raise ReportError(f"no {shape} {stage} row in the scale sources")
    return found


def _tail_find(stage, pattern):
    for line in stage.get("tail", []):
        m = re.search(pattern, line)
        if m:
            return m
    return None


def mamba_parameters(d_model, n_layer, vocab=50280, d_state=16, d_conv=4, expand=2):
    """Parameters of a Mamba1 LM with a tied head (bench/scale.py's MambaConfig), from its config."""
    di, r = expand * d_model, -(-d_model // 16)
    layer = (d_model * 2 * di + di * d_conv + di + di * (r + 2 * d_state) + r * di + di + di * d_state + di
             + di * d_model + d_model)
    return vocab * d_model + n_layer * layer + d_model


def _scale_params(runs, shape):
    """(parameters, fp32 GiB, computed?) of a shape: the make stage's count, else computed from the config."""
    for _, run in runs:
        for row in run.get("rows", []):
            if row["shape"] == shape and "parameters" in row:
                return row["parameters"], row["fp32_gib"], False
    for _, run in runs:
        for row in run.get("rows", []):
            if row["shape"] == shape and "d_model" in row:
                n = mamba_parameters(row["d_model"], row["n_layer"])
                return n, n * 4 / 2**30, True
    raise ReportError(f"no {shape} row with its parameter count or shape")


def _scale_notes(runs, shape, stage, s, fp32):
    notes = []
    if stage == "make":
        shards = [f for f in s.get("files", []) if f.endswith(".safetensors")]
        dtype = _scale_stage(runs, shape, "make")[1]["stored_dtype"]
        notes.append(f"{len(shards)} shard{'s' if len(shards) != 1 else ''} ({dtype})" if shards else dtype)
    elif stage == "info" and "peak_rss_gib" in s:
        notes.append(f"the fp32 model + {s['peak_rss_gib'] - fp32:.2f} GiB")
    elif stage == "quantize":
        goal = fp32 + 3
        notes.append(f"goal <= {fp32:.2f} + 3 = {goal:.2f} GiB: **{'met' if s['peak_rss_gib'] <= goal else 'missed'}**")
    elif stage == "export":
        size = s["onnx_gib"] + s["external_data_gib"]
        where = f"{s['external_data_gib']:.2f} GiB external data" if s["external_data_gib"] else \
            f"{s['onnx_gib']:.2f} GiB .onnx"
        goal = fp32 + size + 2
        notes.append(f"{where}; goal {fp32:.2f} + {size:.2f} + 2 = {goal:.2f} GiB: "
                     f"**{'met' if s['peak_rss_gib'] <= goal else 'missed'}**")
    elif stage == "verify":
        m = _tail_find(s, r"cosine mean ([\d.]+).*top-1 agreement ([\d.]+)%")
        b = _tail_find(s, r"relative difference ([\d.]+)%")
        ok = any(line.strip() == "PASSED" for line in s.get("tail", []))
        if m:
            notes.append(f"{'PASSED' if ok else 'FAILED'}: logits cosine {m.group(1)}, top-1 agreement "
                         f"{float(m.group(2)):.0f} %" + (f", bits/token {b.group(1)} % apart" if b else ""))
    elif stage == "build":
        m = _tail_find(s, r"(\d+) -> (\d+) nodes")
        c = _tail_find(s, r"cosine ([\d.]+)")
        if m:
            notes.append(f"{m.group(1)} -> {m.group(2)} nodes" + (f", equal to its input (cosine {c.group(1)})"
                                                                   if c else ""))
    return notes


@renderer
def scale_table(src, paths, shapes="130m,790m,2.8b"):
    """bench/scale.py rows; for each (shape, stage) the last source holding it wins (sources in order)."""
    runs = list(zip(paths, src))
    out = ["| shape | parameters (fp32 GiB) | stage | rc | wall s | peak RSS GiB | load | from | notes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes.split(","):
        params, fp32, computed = _scale_params(runs, shape)
        first = True
        for stage in ("make", "info", "quantize", "export", "verify", "build"):
            s, row, path = _scale_stage(runs, shape, stage)
            notes = _scale_notes(runs, shape, stage, s, fp32)
            head = f"| {shape} | {params / 1e6:.1f} M{'*' if computed else ''} ({fp32:.2f}) |" if first else "| | |"
            first = False
            ld = f"{s['load']:.1f}" if "load" in s else "not recorded"
            out.append(f"{head} {stage} | {s['rc']} | {s['seconds']:.1f} | {s['peak_rss_gib']:.2f} | {ld} | "
                       f"`{os.path.basename(path)}` | {'; '.join(notes)} |")
    return "\n".join(out)


@renderer
def scale_stage(src, shape, stage, what="peak_rss_gib", fmt=".2f"):
    """One stage figure of one bench/scale.py JSON (what: peak_rss_gib, seconds, load)."""
    return num(_scale_stage([("", src[0])], shape, stage)[0][what], fmt)


@renderer
def scale_goals(src, paths, shapes="130m,790m,2.8b"):
    """Whether every memory goal is met, and the peak RSS above each goal's base per shape: quantize over the
    fp32 model (goal + 3 GiB), export over fp32 + the ONNX size (goal + 2 GiB)."""
    runs = list(zip(paths, src))
    margins, ok = {"quantize": [], "export": []}, []
    for stage, slack in (("quantize", 3), ("export", 2)):
        for shape in shapes.split(","):
            _, fp32, _ = _scale_params(runs, shape)
            s = _scale_stage(runs, shape, stage)[0]
            base = fp32 + (s["onnx_gib"] + s["external_data_gib"] if stage == "export" else 0)
            margins[stage].append(num(s["peak_rss_gib"] - base, ".2f"))
            ok.append(s["peak_rss_gib"] - base <= slack)
    head = "Every goal is met" if all(ok) else f"{sum(ok)} of {len(ok)} goals are met"
    return (f"{head}: quantize peaks at fp32 + {' / '.join(margins['quantize'])} GiB (goal + 3), export at fp32 + "
            f"int8 + {' / '.join(margins['export'])} GiB (goal + 2)")


# issue 21's memory goals, GiB of peak RSS per (shape, stage) for the layer-streamed path
STREAM_GOALS = {("2.8b", "quantize"): 3.0, ("2.8b", "export"): 3.0, ("2.8b", "verify"): 8.0,
                ("falcon-mamba-7b", "quantize"): 4.0, ("falcon-mamba-7b", "export"): 4.0}


@renderer
def scale_stream_table(src):
    """Every stage of bench/scale.py runs with --stream (issue 21), as run: wall time, peak RSS, load, and the
    memory goal of the stage where issue 21 sets one."""
    out = ["| shape | parameters (fp32 GiB) | stage | rc | wall s | peak RSS GiB | load | goal |",
           "|---|---|---|---|---|---|---|---|"]
    for run in src:
        for row in run.get("rows", []):
            head = (f"| {row['shape']} | {row['parameters'] / 1e6:.1f} M ({row['fp32_gib']:.2f}) |" if "parameters" in row
                    else f"| {row['shape']} | (not recorded: no make stage) |")
            for st in row["stages"]:
                stage = st["stage"]
                kind = stage.split()[0]
                if st.get("running"):    # scale.py records a stage before it runs: not finished in this record
                    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(st["started"]))
                    out.append(f"{head} {stage} | not finished in this record (started {when}; still running when "
                               "the JSON was taken, or stopped) | | | | |")
                    head = "| | |"
                    continue
                if st.get("resumed"):
                    stage += " --resume"
                argv = st.get("argv", [])        # (recorded from issue 21 on) the stage's own --stream
                if kind in ("export", "verify") and "--stream" in argv:
                    stage = f"{stage} --stream {argv[argv.index('--stream') + 1]}"
                streamed = kind in ("quantize", "export", "verify") and "--stream " in stage and \
                    "--stream off" not in stage
                goal = STREAM_GOALS.get((row["shape"], kind)) if streamed else None
                if st["peak_rss_gib"] is None:     # the stage's process died before reporting (a signal's rc < 0)
                    rc = f"{st['rc']} (killed by signal {-st['rc']})" if st["rc"] < 0 else str(st["rc"])
                    out.append(f"{head} {stage} | {rc} | {st['seconds']:.1f} | not recorded | {st['load']:.1f} | |")
                    head = "| | |"
                    continue
                g = "" if goal is None else \
                    f"<= {goal:.0f} GiB: **{'met' if st['rc'] in (0, 1) and st['peak_rss_gib'] <= goal else 'missed'}**"
                out.append(f"{head} {stage} | {st['rc']} | {st['seconds']:.1f} | {st['peak_rss_gib']:.2f} | "
                           f"{st['load']:.1f} | {g} |")
                head = "| | |"
    return "\n".join(out)


@renderer
def scale_stream_ratio(src, shape, a="quantize --stream on", b="quantize --stream off"):
    """Wall time of stage a over stage b of one shape in one bench/scale.py run (e.g. the streamed quantize over
    the whole-model one), with both loads."""
    row = next((r for r in src[0].get("rows", []) if r["shape"] == shape), None)
    if row is None:
        raise ReportError(f"no {shape} row")
    st = {s["stage"]: s for s in row["stages"]}
    if a not in st or b not in st:
        raise ReportError(f"{shape}: no {a!r} or {b!r} stage")
    return (f"{st[a]['seconds'] / st[b]['seconds']:.2f}x ({st[a]['seconds']:.0f} s against {st[b]['seconds']:.0f} s; "
            f"load {st[a]['load']:.1f} and {st[b]['load']:.1f})")


# ---- bench/state_update_op.py ----------------------------------------------------------------------------

@renderer
def state_update_table(src):
    """One fused decode-step node per row: the baseline build and this tree's, microseconds per call (best of the
    blocks), the speedup, the outputs' difference and the load."""
    run = src[0]
    libs = run["libraries"]
    out = [f"| state | batch | threads | {' | '.join(f'{k} (us)' for k in libs)} | speedup | rel. difference | load |",
           "|---|---|---|" + "---|" * len(libs) + "---|---|---|"]
    for r in run["rows"]:
        th = f"{r['threads']}" + (" (spinning)" if r["threads"] > 1 and r.get("spin") else "")
        cells = " | ".join(f"{r['us'][k]:.1f}" for k in libs)
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        out.append(f"| {r['dtype']} | {r['batch']} | {th} | {cells} | {sp} | {err} | {r['load']:.1f} |")
    return "\n".join(out)


# ---- bench/peers.py --------------------------------------------------------------------------------------

PEER_ORDER = ["mq-deploy ONNX W4A8, ORT + native ops", "mq-deploy ONNX W8A8, ORT + native ops",
              "mq-deploy ONNX FP32, ORT + native ops",
              "mq-deploy ONNX W8A8, ORT (Scan body)", "mq-deploy ONNX FP32, ORT (Scan body)", "mq-deploy PyTorch fp32",
              "llama.cpp Q8_0", "llama.cpp Q4_0", "llama.cpp F32", "transformers fp32"]
PEER_CASES = [("prefill-256", 1), ("prefill-1024", 1), ("decode-128", 1), ("decode-128", 8)]


def _peer_rows(src):
    """(label, {(case, batch): row}) per system per source; an ONNX system is labelled with its graph (the
    source's `graph` field) since two sources ran two versions of the step graph."""
    out = []
    for run in src:
        graph = run.get("rederived", {}).get("onnx_graph")
        systems = [s for s in PEER_ORDER if any(r["system"] == s for r in run["rows"])]
        for s in systems:
            label = f"{s} ({graph})" if graph and "ONNX" in s else s
            out.append((label, s, {(r["case"], r["batch"]): r for r in run["rows"] if r["system"] == s}))
    return out


def _tps(v, case="decode"):
    return f"{v:.0f}" if case.startswith("prefill") else f"{v:.1f}"


@renderer
def peers_table(src, bold="1"):
    """tokens/s and peak RSS per system and case; the sources' rows in order (the first source's first row
    bold)."""
    out = ["| system | prefill 256 tok/s | prefill 1024 tok/s | decode-128 b1 tok/s | decode-128 b8 tok/s "
           "| peak RSS MiB | load |", "|---|---|---|---|---|---|---|"]
    for i, (label, _, by) in enumerate(_peer_rows(src)):
        b = "**" if i == 0 and bold == "1" else ""
        cells = [f"{b}{_tps(by[c]['tokens_per_s'], c[0])}{b}" if c in by else "–" for c in PEER_CASES]
        rss = [r["peak_rss_mib"] for r in by.values()]
        out.append(f"| {b}{label}{b} | " + " | ".join(cells) + f" | {min(rss):.0f}–{max(rss):.0f} | "
                   f"{load_range(list(by.values()))} |")
    return "\n".join(out)


def _peer(src, system, case, batch, graph=None):
    for label, s, by in _peer_rows(src):
        if s == system and (graph is None or f"({graph})" in label) and (case, int(batch)) in by:
            return by[(case, int(batch))]
    raise ReportError(f"no peers row {system!r} {case} b{batch}" + (f" ({graph})" if graph else ""))


W8 = "mq-deploy ONNX W8A8, ORT + native ops"
FP = "mq-deploy ONNX FP32, ORT + native ops"
Q8 = "llama.cpp Q8_0"
TF = "transformers fp32"
FUSED = "fused step graph"


@renderer
def peers_cell(src):
    """README's Benchmarks cell: W8A8 (fused step graph) against llama.cpp Q8_0."""
    w = {c: _peer(src, W8, c[0], c[1], FUSED) for c in PEER_CASES}
    q = {c: _peer(src, Q8, c[0], c[1]) for c in PEER_CASES}
    rss_w = [r["peak_rss_mib"] for r in w.values()]
    rss_q = [r["peak_rss_mib"] for r in q.values()]
    return (f"W8A8 (fused step graph) vs llama.cpp Q8_0: prefill 256 {_tps(w[PEER_CASES[0]]['tokens_per_s'], 'prefill')} vs "
            f"{_tps(q[PEER_CASES[0]]['tokens_per_s'], 'prefill')} tok/s, decode b1 {_tps(w[PEER_CASES[2]]['tokens_per_s'])} vs "
            f"{_tps(q[PEER_CASES[2]]['tokens_per_s'])}, b8 {_tps(w[PEER_CASES[3]]['tokens_per_s'])} vs "
            f"{_tps(q[PEER_CASES[3]]['tokens_per_s'])}, peak RSS {min(rss_w):.0f}–{max(rss_w):.0f} vs "
            f"{min(rss_q):.0f}–{max(rss_q):.0f} MiB (load {load_range(list(w.values()) + list(q.values()))})")


@renderer
def peers_goals(src):
    """The goals of the peers comparison, each met or missed, from the rows."""
    def t(system, c, graph=None):
        return _peer(src, system, c[0], c[1], graph)["tokens_per_s"]

    def verdict(ok):
        return "**met**" if all(ok) else ("**missed**" if not any(ok) else f"**met in {sum(ok)} of {len(ok)}**")

    p256, p1024, d1, d8 = PEER_CASES
    w = {c: t(W8, c, FUSED) for c in PEER_CASES}
    out = []
    r = [w[c] / t(TF, c) for c in (p256, p1024)]
    out.append(f"- Prefill ≥ 3x transformers fp32: {verdict([x >= 3 for x in r])}, {r[0]:.1f}x (L 256) and "
               f"{r[1]:.1f}x (L 1024).")
    r = [w[c] / t(Q8, c) for c in (p256, p1024)]
    out.append(f"- Prefill ahead of llama.cpp Q8_0: {verdict([x > 1 for x in r])}, {r[0]:.1f}x and {r[1]:.1f}x.")
    r = [w[c] / t(Q8, c) for c in (d1, d8)]
    out.append(f"- Decode ahead of llama.cpp Q8_0: {verdict([x > 1 for x in r])}, {r[0]:.2f}x at batch 1 "
               f"({_tps(w[d1])} vs {_tps(t(Q8, d1))} tok/s) and {r[1]:.2f}x at batch 8 ({_tps(w[d8])} vs "
               f"{_tps(t(Q8, d8))}).")
    names = {p256: "prefill 256", p1024: "prefill 1024", d1: "decode b1", d8: "decode b8"}
    parts, missed = [], []
    for c in PEER_CASES:
        fps = [r for label, s, by in _peer_rows(src) if s == FP and c in by for r in [by[c]["tokens_per_s"]]]
        best = max(fps)
        x = w[c] / best
        parts.append(f"{names[c]} **{x:.2f}x** (vs {_tps(best, c[0])})")
        if x < 1.5:
            missed.append(f"{names[c]}, missed by {(1 - x / 1.5) * 100:.0f} %")
    v = "**met**" if not missed else ("**missed**" if len(missed) == len(parts) else
                                      "**met except " + "; ".join(missed) + "**")
    out.append("- int8 ≥ 1.5x our own FP32 on equal footing (both with native ops, each against the faster FP32 "
               "step graph for the case): " + ", ".join(parts) + f": {v}.")
    parts, ok = [], []
    for c in PEER_CASES:
        a, b = _peer(src, W8, c[0], c[1], FUSED)["peak_rss_mib"], _peer(src, Q8, c[0], c[1])["peak_rss_mib"]
        ok.append(a <= 2 * b)
        parts.append(f"{a / b:.2f}x ({names[c]}, {a:.0f} vs {b:.0f} MiB)")
    out.append(f"- Peak RSS ≤ 2x llama.cpp Q8_0: {verdict(ok)}{' in every case' if all(ok) else ''}: "
               + ", ".join(parts) + ".")
    return "\n".join(out)


@renderer
def peers_ms_per_token(src, system, case="decode-128", batch="1", graph=None):
    """Milliseconds per decode step of one row (1000 / tokens/s at batch 1)."""
    r = _peer(src, system, case, batch, graph)
    return f"{1000 / r['tokens_per_s'] * int(batch):.1f} ms"


def _short(x, target):
    """'**met**, 1.23x' or '**missed** by 12 %, 0.88x' for a ratio against the ratio the goal asks for."""
    return f"**met**, {x:.2f}x" if x >= target else f"**missed** by {(1 - x / target) * 100:.0f} %, {x:.2f}x"


@renderer
def peers_profile(src, case, top="5"):
    """The op types taking the most of ORT's kernel time in one case of a `bench/peers.py --profile` JSON, with
    their shares, and the wall time per run."""
    p = src[0]["profile"].get(case)
    if p is None:
        raise ReportError(f"peers_profile: no case {case!r} (have {', '.join(src[0]['profile'])})")
    ops = sorted(p["ms_by_op"].items(), key=lambda kv: -kv[1])[:int(top)]
    shares = ", ".join(f"{k} {v / p['kernel_ms'] * 100:.0f} %" for k, v in ops)
    return f"{shares} of the kernel time ({p['wall_ms']:.1f} ms wall per run)"


@renderer
def peers_run_goals(src):
    """The goals of one peers run (all rows side by side, e.g. the Mamba2 or hybrid shape), per case: W8A8 on
    ORT with the native ops against transformers fp32 and llama.cpp Q8_0; where one is missed, by how much."""
    def row(system, c):
        return _peer(src, system, c[0], c[1])

    def t(system, c):
        return row(system, c)["tokens_per_s"]

    p256, p1024, d1, d8 = PEER_CASES
    out = []
    for name, ref, target, cases in (("Prefill ≥ 3x transformers fp32", TF, 3.0, (p256, p1024)),
                                     ("Prefill ahead of llama.cpp Q8_0", Q8, 1.0, (p256, p1024)),
                                     ("Decode ahead of llama.cpp Q8_0", Q8, 1.0, (d1, d8))):
        parts = [f"{c[0]} b{c[1]} {_short(t(W8, c) / t(ref, c), target)} ({_tps(t(W8, c), c[0])} vs "
                 f"{_tps(t(ref, c), c[0])} tok/s)" for c in cases]
        out.append(f"- {name}: " + "; ".join(parts) + ".")
    parts = []
    for c in PEER_CASES:
        a, b = row(W8, c)["peak_rss_mib"], row(Q8, c)["peak_rss_mib"]
        x = a / b
        v = "met" if x <= 2 else f"**missed** by {(x / 2 - 1) * 100:.0f} %"
        parts.append(f"{c[0]} b{c[1]} {x:.2f}x ({a:.0f} vs {b:.0f} MiB, {v})")
    ok = all(row(W8, c)["peak_rss_mib"] <= 2 * row(Q8, c)["peak_rss_mib"] for c in PEER_CASES)
    out.append(f"- Peak RSS ≤ 2x llama.cpp Q8_0: {'**met**' if ok else '**not met in every case**'}: "
               + "; ".join(parts) + ".")
    return "\n".join(out)


W4 = "mq-deploy ONNX W4A8, ORT + native ops"
Q4 = "llama.cpp Q4_0"


def _limits(d):
    lim = d.get("roofline", {}).get("limits")
    if not lim:
        raise ReportError("the peers JSON has no roofline (bench/peers.py before issue 22)")
    return lim


@renderer
def peers_roofline(src):
    """Each row of one peers run (bench/peers.py, issue 22 on) against the machine's limits measured in the same
    run: decode, MiB of weights read per token, the read bandwidth that implies and its share of the measured
    one; prefill, the GEMM MACs per token, the rate and its share of ORT's int8 GEMM peak."""
    d = src[0]
    lim = _limits(d)
    order = {s: i for i, s in enumerate(PEER_ORDER)}
    rows = sorted(d["rows"], key=lambda r: (order.get(r["system"], len(order)), PEER_CASES.index((r["case"],
                                                                                                 r["batch"]))))
    out = [f"Limits measured in the run ({d['threads']} threads): read {lim['read_gbps']:.1f} GB/s, ONNX Runtime's "
           f"int8 GEMM {lim['int8_gemm_gmacs']:.0f} G MAC/s.", "",
           "| system | case | tok/s | weights MiB/token | read GB/s | % of read | G MAC/s | % of int8 peak | load |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = "read_gbps" in r
        cells = ([f"{r['weights_mib_per_token']:.1f}", f"{r['read_gbps']:.2f}", f"{r['read_fraction'] * 100:.0f} %",
                  "", ""] if dec else ["", "", "", f"{r['gmacs']:.1f}", f"{r['int8_peak_fraction'] * 100:.0f} %"])
        out.append(f"| {r['system']} | {r['case']} b{r['batch']} | {_tps(r['tokens_per_s'], r['case'])} | "
                   + " | ".join(cells) + f" | {load_range(r)} |")
    return "\n".join(out)


@renderer
def peers_kernels(src):
    """What one peers run ran: the llama.cpp build (and whether the AMX probe rebuilt it), per GGUF its weights'
    buffers and repacked layouts; ONNX Runtime's version, the CPU flags its int8 kernels depend on, and the ops
    of the graphs it optimized."""
    d = src[0]
    k = d.get("kernels")
    if not k:
        raise ReportError("the peers JSON records no kernels (bench/peers.py before issue 22)")
    out = []
    lc = k.get("llama_cpp")
    if lc:
        b = lc["build"]
        probe = "; ".join(f"{q} exit {r['returncode']}" + (f" ({r['signal']})" if r.get("signal") else "")
                          for q, r in lc["probes"]["native"].items())
        out.append(f"- llama.cpp ({d['llama_cpp_python']} sdist): {b['variant']} build, ISA "
                   f"{' '.join(x.strip('_') for x in b['isa'])}, repacked kernels "
                   f"{b['ggml_options'].get('GGML_CPU_REPACK', '?')}; the native build's probe (a 32-token prefill): "
                   f"{probe}" + ("; rebuilt without AMX" if lc["rebuilt_without_amx"] else "") + ".")
        for q, r in lc["kernels"].items():
            bufs = ", ".join(f"{n} {v:.0f} MiB" for n, v in r["buffers_mib"].items())
            rep = ", ".join(f"{n} ({c} tensors)" for n, c in r["repacked"].items()) or "none"
            out.append(f"  - {q}: weights in {bufs}; repacked: {rep}; types "
                       + ", ".join(f"{t} {c}" for t, c in r["tensor_types"].items()) + ".")
    o = k.get("onnxruntime")
    if o:
        flags = ", ".join(f for f, on in o["mlas_cpu_flags"].items() if on) or "none of them"
        out.append(f"- ONNX Runtime {o['onnxruntime']} ({', '.join(o['providers'])}), {o['intra_op_threads']} "
                   f"threads, session options {', '.join(f'{a}={v}' for a, v in o['session_config'].items())}; "
                   f"CPU flags of its int8 kernels present: {flags}.")
        for f, ops in o["optimized_ops"].items():
            gemm = {n: c for n, c in ops.items() if n.endswith(("MatMulIntegerToFloat", "MatMulNBits", "MatMulInteger",
                                                                "MatMul"))}
            out.append(f"  - {f}: " + ", ".join(f"{n.split('::')[-1]} {c}" for n, c in gemm.items()) + ".")
    return "\n".join(out)


@renderer
def peers_issue22_goals(src):
    """Issue 22's goals on one peers run (the first source; the others, an earlier run's files, for batch 8: its
    W8A8 and Q8_0 rows, from whichever file holds them): each met or missed by how much."""
    d = src[0]
    lim = _limits(d)
    by = {(r["system"], r["case"], r["batch"]): r for r in d["rows"]}

    def row(system, case, batch):
        r = by.get((system, case, batch))
        if r is None:
            raise ReportError(f"no peers row {system!r} {case} b{batch}")
        return r

    out = []
    for ours, peer, target in ((W4, Q4, 1.2), (W8, Q8, 1.3)):
        a, b = row(ours, "decode-128", 1)["tokens_per_s"], row(peer, "decode-128", 1)["tokens_per_s"]
        out.append(f"- {ours.split(',')[0].replace('mq-deploy ONNX ', '')} decode b1 ≥ {target}x {peer}: "
                   f"{_short(a / b, target)} ({_tps(a)} vs {_tps(b)} tok/s).")
    def fraction_goal(label, frac, target, detail):
        x = frac / target
        return (f"- {label}: " + (f"**met**, {frac * 100:.0f} %" if x >= 1 else
                                  f"**missed** by {(1 - x) * 100:.0f} %, {frac * 100:.0f} %") + f" ({detail}).")

    r = row(W8, "decode-128", 1)
    out.append(fraction_goal("W8A8 decode b1 reads its weights at ≥ 60 % of the measured read bandwidth",
                             r["read_fraction"], 0.6, f"{r['read_gbps']:.1f} of {lim['read_gbps']:.1f} GB/s, "
                                                      f"{r['weights_mib_per_token']:.0f} MiB a token"))
    r = row(W8, "prefill-1024", 1)
    out.append(fraction_goal("Prefill 1024 ≥ 25 % of the measured int8 GEMM peak (W8A8)", r["int8_peak_fraction"],
                             0.25, f"{r['gmacs']:.1f} of {lim['int8_gemm_gmacs']:.0f} G MAC/s"))
    a, q = row(W8, "decode-128", 8)["tokens_per_s"], row(Q8, "decode-128", 8)["tokens_per_s"]
    line = f"- No regression at batch 8: W8A8 decode b8 {_tps(a)} tok/s, {a / q:.2f}x llama.cpp Q8_0 in this run"
    if len(src) > 1:
        prev: dict = {}
        for d_prev in src[1:]:
            for r in d_prev["rows"]:
                prev.setdefault((r["system"], r["case"], r["batch"]), r)
        pa, pq = prev.get((W8, "decode-128", 8)), prev.get((Q8, "decode-128", 8))
        if pa and pq:
            x = (a / q) / (pa["tokens_per_s"] / pq["tokens_per_s"])
            line += (f"; the earlier run {pa['tokens_per_s'] / pq['tokens_per_s']:.2f}x: "
                     + ("**met**" if x >= 0.95 else f"**missed**, the ratio fell by {(1 - x) * 100:.0f} %"))
    out.append(line + ".")
    return "\n".join(out)


# ---- bench/serve.py --------------------------------------------------------------------------------------

@renderer
def serve_vim_table(src):
    d = src[0]
    dv = d["direct"]["vim"]
    out = ["| Vim | images/s | p50 | p99 | vs direct | load |", "|---|---|---|---|---|---|",
           f"| direct OrtRunner, batch 1 | {dv['images_per_s']:.1f} | {dv['p50_ms']:.1f} ms | {dv['p99_ms']:.1f} ms "
           f"| 1.00x | |"]
    for r in d["vim"]:
        out.append(f"| served, concurrency {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} ms | "
                   f"{r['p99_ms']:.1f} ms | {r['vs_direct']:.2f}x | {r['load'][0]:.1f} |")
    return "\n".join(out)


@renderer
def serve_lm_table(src):
    """bench/serve.py's LM rows. JSONs from before responses could hold several tokens have a gap per token
    (inter_token_*); later ones a gap per response (inter_response_*) and the tokens per response."""
    d = src[0]
    dl = d["direct"]["lm"]
    per_response = "inter_response_p50_ms" in d["lm"][0]

    def first(r):       # the oldest JSONs have no first-token p99
        return _ms(r["first_token_p50_ms"]) + (f" / {_ms(r['first_token_p99_ms'])}" if "first_token_p99_ms" in r else "")

    out = ["| LM generation | tokens/s | first token p50" + (" / p99" if "first_token_p99_ms" in dl else "") + " | " + (
        "between responses p50 / p99 | tokens per response |" if per_response else "inter-token p50 / p99 |")
        + " vs direct | load |", "|---|---|---|---|" + ("---|" if per_response else "") + "---|---|",
        f"| direct `generate`, one stream at a time | {dl['tokens_per_s']:.1f} | {first(dl)} | |"
        + (" |" if per_response else "") + " 1.00x | |"]
    for r in d["lm"]:
        n = r["concurrency"]
        gap = (f"{r['inter_response_p50_ms']:.1f} / {r['inter_response_p99_ms']:.1f} ms | {r['tokens_per_response']:.1f}"
               if per_response else f"{r['inter_token_p50_ms']:.1f} / {r['inter_token_p99_ms']:.1f} ms")
        out.append(f"| served, {n} stream{'s' if n > 1 else ''} | {r['tokens_per_s']:.1f} | {first(r)} | {gap} | "
                   f"{r['vs_direct']:.2f}x | {r['load'][0]:.1f} |")
    if "batch16_tokens_per_s" in dl:
        out.append(f"\nIn-process, 16 prompts as one batch (`generate_batch`): {dl['batch16_tokens_per_s']:.1f} tokens/s.")
    return "\n".join(out)


def _ms(v):
    return f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"


@renderer
def state_fidelity_table(src):
    """bench/state_fidelity.py: per sample and state dtype, bytes per sequence, greedy agreement with the
    float32-state artifact (free-running and teacher-forced), median first divergence, step-scored bits/byte."""
    d = src[0]
    spans = sorted({int(k) for s in d["samples"] for r in s["dtypes"].values() for k in r["free_agreement"]})
    head = (["sample", "state", "bytes / sequence"] + [f"free-running agreement {n}" for n in spans]
            + [f"teacher-forced agreement {n}" for n in spans] + ["median first divergence", "bits/byte (steps)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in d["samples"]:
        for dtype, r in s["dtypes"].items():
            fd = sorted(r["first_divergence"])
            cells = [s["sample"], dtype, f"{r['state_bytes_per_sequence']:,} ({r['bytes_ratio_vs_fp32']:.2f}x smaller)"
                     if dtype != "fp32" else f"{r['state_bytes_per_sequence']:,}"]
            cells += [f"{100 * r['free_agreement'][str(n)]:.2f} %" for n in spans]
            cells += [f"{100 * r['forced_agreement'][str(n)]:.2f} %" for n in spans]
            cells += [f"{fd[len(fd) // 2]}" + (" (none diverged)" if fd[0] == s["tokens"] else ""),
                      f"{r['step_bits_per_byte']:.4f}" + ("" if dtype == "fp32" else f" ({r['bits_change_pct']:+.3f} %)")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{d['samples'][0]['prompts']} prompts of {d['samples'][0]['prompt_bytes']} bytes, " \
        f"{d['samples'][0]['tokens']} tokens; bits/byte on {d['samples'][0]['windows']} held-out windows of " \
        f"{d['samples'][0]['window_len']} bytes, one token per call; load {load_range(d)}."


@renderer
def state_step_table(src):
    """bench/state_step.py: per sample and batch, the decode step's time with float32, float16 and int8 states
    (int8 converted by graph nodes around the fused ops, and inside them), and each one's ratio to float32's."""
    d = src[0]
    names = list(dict.fromkeys(c["variant"] for s in d["samples"] for c in s["cases"]))
    head = ["sample", "batch"] + [f"{n} (ms / step)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in d["samples"]:
        for b in sorted({c["batch"] for c in s["cases"]}):
            by = {c["variant"]: c for c in s["cases"] if c["batch"] == b}
            cells = [f"{by[n]['step_ms']:.3f}" + ("" if by[n]["vs_fp32"] == 1 else f" ({by[n]['vs_fp32']:.2f}x)")
                     for n in names]
            lines.append(f"| {s['sample']} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nMedian call of the best of {d['rounds']} rounds of {d['calls']} decode calls, "
                               f"each fed the last one's states; {d['threads']} threads; load {load_range(d)}.")


@renderer
def state_op_table(src):
    """bench/state_step.py --op-shapes: one fused step node alone at published layer shapes, float32 states
    against int8 states (the op's own decoding and encoding), per batch."""
    d = src[0]
    if not d.get("ops"):
        raise ReportError("the JSON holds no --op-shapes figures")
    lines = ["| layer shape | batch | float32 states (us / call) | int8 states (us / call) |", "|---|---|---|---|"]
    for shape in dict.fromkeys(o["shape"] for o in d["ops"]):
        for b in sorted({o["batch"] for o in d["ops"] if o["shape"] == shape}):
            by = {o["variant"]: o for o in d["ops"] if o["shape"] == shape and o["batch"] == b}
            i8 = by["int8 states"]
            lines.append(f"| {shape} | {b} | {by['float32 states']['us']:.1f} | {i8['us']:.1f} ({i8['vs_fp32']:.2f}x) |")
    return "\n".join(lines) + (f"\n\nOne node (the int8 op of one layer, random weights and states), median call of "
                               f"the best of {d['rounds']} rounds of {d['calls']}; {d['threads']} threads; "
                               f"load {load_range(d)}.")


@renderer
def step_batch_scaling(src):
    """bench/state_step.py: per sample and state variant, the step graph's tokens/s at each batch over batch 1's
    (the step graph alone, no server and no Python between calls)."""
    d = src[0]
    out = []
    for s in d["samples"]:
        for name in dict.fromkeys(c["variant"] for c in s["cases"]):
            cases = sorted((c for c in s["cases"] if c["variant"] == name), key=lambda c: c["batch"])
            one = next(c for c in cases if c["batch"] == 1)
            out.append(f"- {s['sample']}, {name}: " + ", ".join(
                f"batch {c['batch']} {c['tokens_per_s'] / one['tokens_per_s']:.2f}x" for c in cases if c["batch"] > 1)
                + f" the tokens/s of batch 1 ({one['tokens_per_s']:.0f})")
    return "\n".join(out) + f"\n\n(load {load_range(d)})"


@renderer
def serve_vs_step(src):
    """A bench/serve.py JSON against bench/state_step.py's (the same sample's W8A8 step graph alone, float32
    states): served tokens/s at 1 and 16 streams as a share of the bare step graph's at batch 1 and 16, and what
    16 streams would need to serve for the c=16 / c=1 >= 5 goal."""
    serve, step = src
    sample = next(s for s in step["samples"] if s["sample"] == "mamba-byte-lm")
    bare = {c["batch"]: c["tokens_per_s"] for c in sample["cases"] if c["state_dtype"] == "float32"}
    lm = {r["concurrency"]: r["tokens_per_s"] for r in serve["lm"]}
    if 1 not in bare or 16 not in bare or 1 not in lm or 16 not in lm:
        raise ReportError("serve_vs_step needs batch 1 and 16 in the step JSON and 1 and 16 streams served")
    return (f"- 1 stream served: {lm[1]:.0f} tokens/s, {lm[1] / bare[1]:.2f} of the bare step graph at batch 1 "
            f"({bare[1]:.0f})\n"
            f"- 16 streams served: {lm[16]:.0f} tokens/s, {lm[16] / bare[16]:.2f} of the bare step graph at batch 16 "
            f"({bare[16]:.0f})\n"
            f"- the goal, 5x one stream: {5 * lm[1]:.0f} tokens/s, {5 * lm[1] / bare[16]:.2f} of the bare step graph "
            f"at batch 16\n\n(load {load_range(serve, step)})")


@renderer
def state_rules_table(src):
    """bench/state_fidelity.py --variants: int8 state rules on the float PyTorch model."""
    d = src[0]
    head = ["sample", "rule", "free-running agreement", "teacher-forced agreement", "median first divergence",
            "bits/byte (steps)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in d["variants"]:
        for name, r in v["rules"].items():
            fd = sorted(r["first_divergence"])
            lines.append(f"| {v['sample']} | {name} | {100 * r['free_agreement']:.2f} % | "
                         f"{100 * r['forced_agreement']:.2f} % | {fd[len(fd) // 2]} | {r['step_bits_per_byte']:.4f} |")
    v = d["variants"][0]
    return "\n".join(lines) + f"\n\n{v['prompts']} prompts, {v['tokens']} tokens; bits/byte on {v['windows']} " \
        f"windows of {v['window_len']} bytes."


@renderer
def state_goals(src):
    """The int8 / fp16 state goals of issue 23, met or missed by how much (worst sample)."""
    d = src[0]
    out = []

    def line(goal, target, vals, better="high", fmt="{:.2f}"):
        worst = min(vals) if better == "high" else max(vals)
        ok = worst >= target if better == "high" else worst <= target
        out.append(f"- {goal} {'>=' if better == 'high' else '<='} {fmt.format(target)}: worst sample "
                   f"{fmt.format(worst)} ({'met' if ok else '**missed**'})")

    rows = [(s, s["dtypes"]) for s in d["samples"]]
    line("int8 state bytes per sequence, times smaller than fp32", 3.5, [r["int8"]["bytes_ratio_vs_fp32"] for _, r in rows],
         fmt="{:.2f}x")
    for kind in ("free", "forced"):
        word = "free-running" if kind == "free" else "teacher-forced"
        line(f"int8 {word} greedy agreement over 512", 99, [100 * r["int8"][f"{kind}_agreement"]["512"] for _, r in rows],
             fmt="{:.2f} %")
        line(f"int8 {word} greedy agreement over 2048", 95,
             [100 * r["int8"][f"{kind}_agreement"]["2048"] for _, r in rows], fmt="{:.2f} %")
    line("int8 step-scored bits/byte change", 0.5, [r["int8"]["bits_change_pct"] for _, r in rows], better="low",
         fmt="{:+.3f} %")
    for kind in ("free", "forced"):
        word = "free-running" if kind == "free" else "teacher-forced"
        line(f"fp16 {word} greedy agreement over 2048", 99.5,
             [100 * r["fp16"][f"{kind}_agreement"]["2048"] for _, r in rows], fmt="{:.2f} %")
    return "\n".join(out)


@renderer
def serve_inline_vs_bls(src):
    """Two bench/serve.py JSONs of one session, --generate-step inline and bls: per concurrency level the
    tokens/s of each and their ratio, first-token p99, the mean batch and the CPU per token by process."""
    a, b = src[0], src[1]
    if (a.get("generate_step"), b.get("generate_step")) != ("inline", "bls"):
        raise ReportError("give the --generate-step inline JSON, then the bls one")

    def cpu(r):
        c = r["cpu_ms_per_token"]
        stubs = sum(v for k, v in c.items() if k.startswith("stub "))
        return f"{c.get('tritonserver', 0):.2f} / {stubs:.2f} / {c.get('client (this bench)', 0):.2f}"

    out = ["| streams | tokens/s inline | tokens/s bls | inline / bls | first-token p99 inline / bls | "
           "mean batch inline / bls | CPU ms per token, server / stubs / client: inline | bls |",
           "|---|---|---|---|---|---|---|---|"]
    by_b = {r["concurrency"]: r for r in b["lm"]}
    for r in a["lm"]:
        q = by_b.get(r["concurrency"])
        if q is None:
            continue
        out.append(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {q['tokens_per_s']:.1f} | "
                   f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x | {_ms(r['first_token_p99_ms'])} / "
                   f"{_ms(q['first_token_p99_ms'])} | {r['step_model']['mean_batch']:.1f} / "
                   f"{q['step_model']['mean_batch']:.1f} | {cpu(r)} | {cpu(q)} |")
    return "\n".join(out) + (f"\n\nIn-process, one caller: {a['direct']['lm']['tokens_per_s']:.1f} (inline run) and "
                              f"{b['direct']['lm']['tokens_per_s']:.1f} tokens/s (bls run); 16 prompts as one batch "
                              f"in-process: {a['direct']['lm']['batch16_tokens_per_s']:.1f} tokens/s; load "
                              f"{load_range(a)} and {load_range(b)}.")


@renderer
def serve_versions(src):
    """Several bench/serve.py JSONs of one session (a tree before a change, and settings of the change): per
    concurrency level, tokens/s and first-token p99 of each, and each one's tokens/s over the first's."""
    def label(d):
        if d.get("response_interval_us") is None:
            return f"before ({d['run']['commit'][:7]})"
        states = d.get("state_dtype", "float32")
        budget = d.get("response_streams")
        return (f"interval {d['response_interval_us'] / 1000:g} ms, at most {d['max_tokens_per_response']} tokens, "
                f"threads {d['threads'] or 'ORT default'}" + ("" if states == "float32" else f", {states} states")
                + ("" if budget is None else f", budget {budget} streams"))

    levels = [r["concurrency"] for r in src[0]["lm"]]
    out = ["| streams | " + " | ".join(label(d) for d in src) + " |", "|---|" + "---|" * len(src)]
    for c in levels:
        rows = [next((r for r in d["lm"] if r["concurrency"] == c), None) for d in src]
        if any(r is None for r in rows):
            raise ReportError(f"a JSON has no row at concurrency {c}")
        base = rows[0]["tokens_per_s"]
        out.append(f"| {c} | " + " | ".join(
            f"{r['tokens_per_s']:.0f} tokens/s" + (f" ({r['tokens_per_s'] / base:.2f}x)" if k else "")
            + f", first token p99 {_ms(r['first_token_p99_ms'])}" for k, r in enumerate(rows)) + " |")
    inproc = " / ".join(f"{d['direct']['lm']['tokens_per_s']:.0f}" for d in src)
    return "\n".join(out) + (f"\n\nIn-process, one stream (each run's own measurement, same order): {inproc} tokens/s; "
                             f"load {load_range(*src)}.")


@renderer
def serve_goals(src):
    """The serving goals a bench/serve.py JSON evaluated (its `goals`), each met or missed by how much."""
    out = []
    for g in src[0]["goals"]:
        op, target = g["target"].split()
        t, v = float(target), g["value"]
        miss = "" if g["met"] else (f", **missed**: {t / v:.1f}x short" if op == ">=" else f", **missed**: {v / t:.1f}x over")
        out.append(f"- {g['goal']} {g['target']}: {v:.2f}{' (met)' if g['met'] else miss}"
                   + (f" ({g['note']})" if g.get("note") else ""))
    return "\n".join(out)


@renderer
def serve_summary(src):
    """One sentence of a serve JSON: direct and served throughput per level, and the ratios."""
    d = src[0]
    v, lm = d["vim"], d["lm"]
    return (f"Vim direct {d['direct']['vim']['images_per_s']:.1f} images/s; served "
            + ", ".join(f"{r['images_per_s']:.1f} (c={r['concurrency']})" for r in v) + ", which is "
            + " / ".join(f"{r['vs_direct']:.2f}x" for r in v)
            + f". LM direct {d['direct']['lm']['tokens_per_s']:.1f} tokens/s; served "
            + " / ".join(f"{r['tokens_per_s']:.1f}" for r in lm) + ", which is "
            + " / ".join(f"{r['vs_direct']:.2f}x" for r in lm) + f" (load {load_range(d)})")


@renderer
def serve_range(src, kind, levels="1"):
    """The vs-direct range over the sources at the given concurrency levels (kind: vim, lm or vim,lm)."""
    want = {int(x) for x in levels.split(",")}
    vals = [r["vs_direct"] for d in src for k in kind.split(",") for r in d[k] if r["concurrency"] in want]
    return span(vals, ".2f") + "x"


# ---- README's Benchmarks table ---------------------------------------------------------------------------

@renderer
def forward_cell(src):
    d = src[0]
    side = "ours faster" if d["speedup"] > 1 else "ours slower" if d["speedup"] < 1 else "a tie"
    return (f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}: ours {d['median_ms']['ours']:.0f} ms, "
            f"transformers {d['median_ms']['transformers']:.0f} ms: **{d['speedup']:.2f}x**, {side} "
            f"({_load_nice(d)})")


@renderer
def quantize_cell(src):
    d = src[0]
    return (f"{d['wall_s']:.1f} s wall, {d['peak_rss_gib']:.2f} GiB peak RSS (goals {d['goals']['wall_s']:.0f} s, "
            f"{d['goals']['peak_rss_bytes'] / 1e9:.0f} GB: {'met' if _quantize_met(d) else 'missed'}; {_load_nice(d)})")


def _quantize_met(d):
    return d["wall_s"] <= d["goals"]["wall_s"] and d["peak_rss_gib"] * 2**30 <= d["goals"]["peak_rss_bytes"]


@renderer
def scan_variants_cell(src):
    """README's Benchmarks cell for bench/scan_variants.py: each variant's time over the step loop's."""
    d = src[0]
    r = {k: [row["vs_step_loop"][k] for row in d["rows"]] for k in ("chunked-par", "log-scan", "reference")}
    wins = all(v > 1 for vs in r.values() for v in vs)
    return (("the step loop is the fastest at every shape" if wins else "the step loop is not the fastest at every shape")
            + f"; time over the step loop's: chunked-parallel {span(r['chunked-par'], '.0f')}x, doubling scan "
            f"{span(r['log-scan'], '.0f')}x, the reference loop {span(r['reference'], '.1f')}x ({_load_nice(d)})")


@renderer
def scan_cpu_cell(src, b="1", L="1024", D="1536"):
    d = src[0]
    r = get(d, f"rows[b={b}&L={L}&D={D}]")
    t = r["tokens_per_s"]
    return (f"b{b} L{L} D{D} N{r['N']}: {t['native']:,.0f} tok/s native vs {t['fast_fp32']:,.0f} fast fp32 torch "
            f"({r['native_vs_fast']:.1f}x) vs {t['int8_ref']:,.0f} int8 reference ({r['native_vs_ref']:.1f}x) "
            f"({_load_nice(d)})")


@renderer
def ort_custom_op_cell(src):
    d = src[0]
    rows = d["rows"]
    i8 = get(d, "rows[model=1 SelectiveScan b1 L1024 D768 N16]")
    fl = get(d, "rows[model=1 SelectiveScanFloat b1 L1024 D768 N16]")
    eq = [r["int8_vs_float_native"] for r in rows if "int8_vs_float_native" in r]
    return (f"int8 op b1 L1024 D768: {i8['speedup']:.1f}x, float op: {fl['speedup']:.1f}x; native int8 vs native "
            f"float op: {span(eq, '.2f')}x ({_load_nice(d)})")


# ---- bench/ort.py ----------------------------------------------------------------------------------------

ORT_GOAL = 1.5    # int8 over FP32 on equal footing (both with native ops): the goal the table is read against


def _ort_label(r, short=False):
    lm = r["model"] == "lm"
    if short:
        return f"{'LM' if lm else 'Vim'} b{r['shape'][0]}"
    return f"{'LM' if lm else 'Vim'}, {r['case']}"


@renderer
def ort_table(src):
    """bench/ort.py: FP32 and int8 graphs, function bodies vs native ops, and the dense online Hadamard."""
    out = ["| case | body: FP32 | body: int8 | ratio | native: FP32 | native: int8 | **ratio (equal footing)** "
           "| int8, dense Hadamard | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in src[0]["rows"]:
        t = r["ms"]
        out.append(f"| {_ort_label(r)} | {t['fp32']:.1f} ms | {t['int8']:.1f} ms | {t['fp32'] / t['int8']:.2f}x | "
                   f"{t['fp32 native']:.1f} ms | {t['int8 native']:.1f} ms | "
                   f"**{t['fp32 native'] / t['int8 native']:.2f}x** | {t['int8 native dense']:.1f} ms | {r['load']:.1f} |")
    return "\n".join(out)


@renderer
def ort_cell(src):
    """README's Benchmarks cell for bench/ort.py."""
    d = src[0]
    body = ", ".join(f"{_ort_label(r, True)} {r['ms']['fp32'] / r['ms']['int8']:.2f}x" for r in d["rows"])
    nat = ", ".join(f"{_ort_label(r, True)} **{r['ms']['fp32 native'] / r['ms']['int8 native']:.2f}x**"
                    for r in d["rows"])
    return f"function bodies on both sides: {body}; native ops on both sides: {nat} ({_load_nice(d)})"


def _share(ops, names):
    total = sum(ops.values())
    return sum(v for k, v in ops.items() if k in names) / total * 100 if total else 0.0


SCAN_OPS = ("Scan", "SelectiveScan", "SelectiveScanFloat")
MATMUL_OPS = ("MatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm")


@renderer
def ort_prose(src):
    """What the bench/ort.py run says: equal-footing ratios against the goal, and the dense Hadamard."""
    d = src[0]
    rows = d["rows"]
    eq = {_ort_label(r, True): r["ms"]["fp32 native"] / r["ms"]["int8 native"] for r in rows}
    missed = [f"by {(1 - v / ORT_GOAL) * 100:.0f} % at {k}" for k, v in eq.items() if v < ORT_GOAL]
    verdict = "met everywhere" if not missed else ("missed " + ", ".join(missed))
    dense, faster = [], []
    for r in rows:
        t = r["ms"]
        x = t["int8 native dense"] / t["int8 native"]
        faster.append(x > 1)
        dense.append(f"{x:.2f}x at {_ort_label(r, True)} ({t['int8 native dense']:.1f} -> {t['int8 native']:.1f} ms)")
    where = ("faster than the dense product in every case" if all(faster) else
             "slower than the dense product in every case" if not any(faster) else
             "faster than the dense product in some cases, slower in others")
    out = [f"With the same kind of scan on both sides the int8 artifact is {span(list(eq.values()), '.2f')}x faster "
           f"than its FP32 twin at these small shapes (goal {ORT_GOAL}x: {verdict}). With function bodies on "
           f"both sides the ratio is {span([r['ms']['fp32'] / r['ms']['int8'] for r in rows], '.2f')}x. The "
           f"factored online Hadamard (two small MatMuls in place of one [384, 384] product) is {where} (dense "
           f"time over factored): " + ", ".join(dense) + f". One run of the script ({_load_nice(d)}): compare "
           "within a row."]
    prof = [r for r in rows if "profile_ms_by_op" in r]
    if prof:
        body = [_share(r["profile_ms_by_op"][k], SCAN_OPS) for r in prof for k in ("fp32", "int8")]
        nat = [_share(r["profile_ms_by_op"][k], SCAN_OPS) for r in prof for k in ("fp32 native", "int8 native")]
        mm = [_share(r["profile_ms_by_op"][k], MATMUL_OPS) for r in prof for k in ("fp32 native", "int8 native")]
        out.append("")
        out.append(f"Where the time goes (`--profile`, ORT's per-node profile summed by op type): with function "
                   f"bodies the ONNX `Scan` is {span(body, '.0f')} % of the time in both graphs; with the native ops "
                   f"the scan op is {span(nat, '.0f')} % and the matmuls {span(mm, '.0f')} %.")
    return "\n".join(out)


def _simd(d):
    flags = d.get("run", {}).get("cpu_flags")
    if flags is None:
        return "the JSON does not record the CPU's SIMD flags"
    return "this CPU has AVX-512 VNNI" if "avx512_vnni" in flags else (
        "this CPU has AVX-VNNI" if "avx_vnni" in flags else "this CPU has no VNNI, only " + ", ".join(flags).upper())


@renderer
def ort_profile(src):
    """README's paragraph on where ORT's time goes, from bench/ort.py --profile."""
    d = src[0]
    prof = [r for r in d["rows"] if "profile_ms_by_op" in r]
    if not prof:
        raise ReportError("the bench/ort.py run has no --profile data")
    body = [_share(r["profile_ms_by_op"][k], SCAN_OPS) for r in prof for k in ("fp32", "int8")]
    nat = [_share(r["profile_ms_by_op"][k], SCAN_OPS) for r in prof for k in ("fp32 native", "int8 native")]
    mm8 = [_share(r["profile_ms_by_op"]["int8 native"], MATMUL_OPS) for r in prof]
    return (f"Where the ORT time goes (`bench/ort.py --profile`, `docs/ort.json`, {_load_nice(d)}): with "
            f"function bodies the ONNX `Scan` is {span(body, '.0f')} % of the time in both graphs (a per-step "
            f"subgraph of small nodes), so int8 matmuls (fused by ORT into `MatMulIntegerToFloat`; {_simd(d)}) "
            f"cannot show. With the native ops on both sides (equal footing) the scan op takes "
            f"{span(nat, '.0f')} % and the matmuls {span(mm8, '.0f')} % of the int8 graph's time at these small "
            f"shapes (the int8 and float scan kernels alone: `bench/ort_custom_op.py`); at the 130m shape the int8 "
            f"step graph's gains are in the peers goals of `docs/results.md`.")


# ---- mq-deploy verify (bench/verify_samples.py, bench/quickstart.py) -------------------------------------

def _metric(m, v):
    return f"{v * 100:.2f} %" if m == "top1" else f"{v:.4f}"


def _verify_cells(rep):
    lg = rep["outputs"]["logits"]
    m = rep["metrics"]
    unit = " top-1" if m["metric"] == "top1" else f" {m['metric'].replace('_per_', '/')}"
    return [f"{lg['cosine_mean']:.6f} ({lg['cosine_min']:.4f})", f"{lg['top1_agreement'] * 100:.2f} %",
            f"{_metric(m['metric'], m['artifact'])} / {_metric(m['metric'], m['reference'])}{unit}",
            f"{m['rel_delta'] * 100:.3f} %", f"{m['samples']:,}",
            rep.get("verdict") or ("PASSED" if rep["passed"] else "FAILED")]


VERIFY_HEAD = ["logits cosine (worst row)", "top-1 agreement", "end metric: ORT int8 / fake quant",
               "relative difference", "samples", "verify"]


@renderer
def verify_table(src):
    """bench/verify_samples.py: one row per case, from verify's own --json report."""
    out = ["| case | " + " | ".join(VERIFY_HEAD) + " | load |", "|---|" + "---|" * (len(VERIFY_HEAD) + 1)]
    for r in src[0]["rows"]:
        out.append(f"| `{r['case']}` | " + " | ".join(_verify_cells(r["report"])) + f" | {r['load_at_start']:.1f} |")
    return "\n".join(out)


@renderer
def verify_case(src, case):
    """One case of bench/verify_samples.py as a sentence."""
    rep = get(src[0], f"rows[case={case}]")["report"]
    c = _verify_cells(rep)
    return (f"{c[5]} (logits cosine {rep['outputs']['logits']['cosine_mean']:.6f}, "
            f"top-1 agreement {c[1]}, {c[2]}, {c[3]} apart, on {c[4]} samples)")


def readme_quickstart_command():
    from quickstart import readme_command

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return readme_command(f.read())


def _duration(s):
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec} s" if m else f"{sec} s"


@renderer
def quickstart_time(src):
    """README's first command from a clean clone in a fresh venv (bench/quickstart.py), with its load; fails
    when README's command is no longer the one that was timed."""
    d = src[0]
    if d["command"] != readme_quickstart_command():
        raise ReportError("README's quick-start command is not the one docs/quickstart.json timed: run "
                          "python bench/quickstart.py --json docs/quickstart.json")
    pip = sum(r["seconds"] for r in d["steps"] if r["command"].startswith("pip "))
    took = (f"{_duration(d['command_seconds'])} on 2 cores, of which `pip install` {_duration(pip)}, at a 1-minute "
            f"load average of {load_range(d['run'])} (commit {d['commit'][:7]})")
    if d["rc"]:
        return f"{took}, and **failed**: `{d['steps'][-1]['command']}` exited {d['rc']}"
    return took


@renderer
def quickstart_verify(src):
    """The verify reports of README's first command (bench/quickstart.py)."""
    out = ["| command | " + " | ".join(VERIFY_HEAD) + " |", "|---|" + "---|" * len(VERIFY_HEAD)]
    for v in src[0]["verify"]:
        out.append(f"| `{v['command']}` | " + " | ".join(_verify_cells(v["report"])) + " |")
    return "\n".join(out)


# ---- samples' training logs ------------------------------------------------------------------------------

@renderer
def train_metric(src, fmt=".3f"):
    """A sample's held-out metric from its train_log.json (LM bits/byte; Vim last epoch's test top-1 in %)."""
    d = src[0]
    if "heldout_bits_per_byte" in d:
        return num(d["heldout_bits_per_byte"], fmt)
    return num(d["epochs"][-1]["test_top1"] * 100, fmt)


# ---- documents, regions and checks -----------------------------------------------------------------------

MARK = re.compile(r"<!-- report:(\S+)([^>]*?)-->(.*?)<!-- /report -->", re.S)
OPEN = re.compile(r"<!-- report:")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
FIGURE = re.compile(r"(?<![\w.\-/])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s?(?:%|x(?![\w])|×|ms\b|s\b|min\b"
                    r"|GiB\b|MiB\b|GB\b|MB\b|tok/s|tokens/s|images/s|bits/byte\b|points?\b)|(?<![\w.\-/])\d+\.\d+(?![\w.])")
VERSIONED = re.compile(r"(?:Runtime|onnxruntime|TensorRT|torch|Python|CUDA|JetPack|nvcc|opset|IR version|"
                       r"transformers|llama-cpp-python)\s+[\d., and]*$")
CITES = re.compile(r"(?:docs|samples|bench)/[\w.\-/*]*\.json\b|bench/\w+\.py")   # a figure source named
REPO_PATH = re.compile(r"(?<![\w./\-])((?:docs|bench|mq_deploy|plugins|samples|tests|\.ci)/[\w.\-/*]*[\w*])")
OUTSIDE = re.compile(r"(?<![\w.])(/(?:work|home|root|Users)/[^\s`)]*|\bDESIGN\.md\b|\bSTYLE\.md\b|\bDESIGN §)")


def documents():
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                              recursive=True))


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def parse_args(argstr):
    try:
        toks = shlex.split(argstr)
    except ValueError as e:
        raise ReportError(f"marker arguments: {e}") from None
    sources, params = [], {}
    for t in toks:
        if "=" in t:
            k, v = t.split("=", 1)
            params[k] = v
        else:
            sources.append(t)
    return sources, params


_json_cache: dict = {}


def load_json(rel):
    path = os.path.normpath(os.path.join(ROOT, rel))
    if not path.startswith(ROOT + os.sep):
        raise ReportError(f"{rel}: outside the repository")
    if path not in _json_cache:
        try:
            with open(path, encoding="utf-8") as f:
                _json_cache[path] = json.load(f)
        except FileNotFoundError:
            raise ReportError(f"{rel}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"{rel}: not a readable JSON file ({e})") from None
    return _json_cache[path]


def render_region(name, argstr):
    if name not in RENDERERS:
        raise ReportError(f"unknown region kind {name!r} (python bench/report.py --list)")
    sources, params = parse_args(argstr)
    data = [load_json(s) for s in sources]
    if "paths" in RENDERERS[name].__code__.co_varnames[:RENDERERS[name].__code__.co_argcount]:
        params["paths"] = sources       # a renderer that names its sources gets their paths too
    try:
        return RENDERERS[name](data, **params)
    except ReportError:
        raise
    except TypeError as e:
        raise ReportError(f"{name}: {e}") from None
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise ReportError(f"{name} on {', '.join(sources)}: {type(e).__name__} {e}") from None


def regenerate(doc, text, errors=None):
    """The document with every region re-rendered. A region that cannot be rendered raises ReportError naming
    doc:line, or, when `errors` is a list, is left as it is and its error appended there."""
    out, pos = [], 0
    for m in MARK.finditer(text):
        where = f"{doc}:{line_of(text, m.start())}"
        if OPEN.search(m.group(3)):
            raise ReportError(f"{where}: region not closed before the next one opens")
        name, argstr, body = m.group(1), m.group(2), m.group(3)
        block = body.startswith("\n")
        try:
            new = render_region(name, argstr)
            if not block and "\n" in new:
                raise ReportError(f"{name} renders several lines: use a block region")
        except ReportError as e:
            if errors is None:
                raise ReportError(f"{where}: {e}") from None
            errors.append(f"{where}: {e}")
            new = body.strip("\n") if block else body
        new_body = "\n" + new.strip("\n") + "\n" if block else new
        out.append(text[pos:m.start(3)] + new_body)
        pos = m.end(3)
    out.append(text[pos:])
    new_text = "".join(out)
    stray = OPEN.search(MARK.sub("", new_text))
    if stray:
        raise ReportError(f"{doc}:{line_of(new_text, stray.start())}: a region opens and never closes")
    return new_text


def first_difference(doc, old, new):
    """The first line where a region's text differs: 'doc:line: ...' with what it says and what it should."""
    for i, (a, b) in enumerate(zip(old.splitlines(), new.splitlines()), 1):
        if a == b:
            continue
        k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        ra = next((m for m in MARK.finditer(a) if m.start(3) <= k <= m.end(3)), None)
        rb = next((m for m in MARK.finditer(b) if m.start(3) <= k <= m.end(3)), None)
        if ra and rb:      # an inline region: show its text, and which region it is
            said, gives = ra.group(3), rb.group(3)
            where = f"region {ra.group(1)}{ra.group(2).rstrip()}"
        else:
            lo = max(0, k - 30)
            said, gives = a[lo:k + 40], b[lo:k + 40]
            pos = sum(len(line) + 1 for line in old.splitlines()[:i - 1])
            blk = next((m for m in MARK.finditer(old) if m.start() <= pos <= m.end()), None)
            where = f"region {blk.group(1)}{blk.group(2).rstrip()}" if blk else "a region"
        return (f"{doc}:{i}: {where} says {said!r} where its JSON gives {gives!r} "
                f"(python bench/report.py rewrites it)")
    return f"{doc}: a region's line count differs from its JSON's rendering (python bench/report.py rewrites it)"


def prose(text):
    """Text with fenced blocks blanked (lines kept), regions, comments, code spans and link targets removed."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = MARK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return text


def check_links(doc, text):
    """Every relative link and repository path exists; no path outside the repository."""
    base = os.path.dirname(os.path.join(ROOT, doc))
    body = re.sub(r"<!--.*?-->", lambda m: " " * len(m.group(0)), text, flags=re.S)
    for m in OUTSIDE.finditer(body):
        return f"{doc}:{line_of(text, m.start())}: cites {m.group(1).rstrip('.,;:')!r}, which is not in the repository"
    for m in re.finditer(r"\]\(([^)\s]+)\)", body):
        target = m.group(1).split("#")[0]
        if not target or re.match(r"[a-z]+:", target):
            continue
        path = os.path.normpath(os.path.join(base, target))
        if not path.startswith(ROOT + os.sep) or not os.path.exists(path):
            return f"{doc}:{line_of(text, m.start())}: link to {target!r}, which does not exist in the repository"
    for m in REPO_PATH.finditer(body):
        p = m.group(1).split("::")[0].rstrip(".")
        if p.endswith((".so", ".so.1")) or "_native/" in p:    # built by pip install, not part of a clone
            continue
        hits = glob.glob(os.path.join(ROOT, p)) if "*" in p else ([p] if os.path.exists(os.path.join(ROOT, p)) else [])
        if not hits:
            return f"{doc}:{line_of(text, m.start())}: names {p!r}, which does not exist in the repository"
    return None


def check_strays(doc, text):
    """A paragraph that cites a JSON or a bench script holds no figure outside a region."""
    clean = prose(text)
    code_free = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), clean)
    code_free = re.sub(r"\]\([^)]*\)", lambda m: "]" + " " * (len(m.group(0)) - 1), code_free)   # keep offsets
    pos = 0
    for para in re.split(r"\n[ \t]*\n", clean):
        start = clean.find(para, pos)
        pos = start + len(para)
        if not CITES.search(para):
            continue
        chunk = code_free[start:start + len(para)]
        for m in FIGURE.finditer(chunk):
            if VERSIONED.search(chunk[max(0, m.start() - 40):m.start()]):
                continue          # a version number (ONNX Runtime 1.32, TensorRT 10.3, 10.16 and 11.1)
            return (f"{doc}:{line_of(clean, start + m.start())}: {m.group(0).strip()!r} is a figure outside any "
                    f"report region in a paragraph that cites a JSON or bench script: generate it from the JSON")
    return None


def run(check: bool, docs=None) -> int:
    """--check: the first problem, one line, exit 1. Otherwise rewrite every region that renders, then list
    what could not be rendered and what the checks find (exit 1 if anything)."""
    problems = []
    for doc in docs or documents():
        path = os.path.join(ROOT, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            new = regenerate(doc, text, None if check else problems)
        except ReportError as e:
            print(e, file=sys.stderr)
            return 1
        if check:
            msg = (first_difference(doc, text, new) if new != text else None) or check_links(doc, text) or \
                check_strays(doc, text)
            if msg:
                print(msg, file=sys.stderr)
                return 1
            continue
        if new != text:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.report-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(new)
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
            os.replace(tmp, path)
            print(f"rewrote {doc}")
        problems += [m for m in (check_links(doc, new), check_strays(doc, new)) if m]
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 at the first disagreement")
    ap.add_argument("--list", action="store_true", help="the region kinds and what they render")
    ap.add_argument("--root", help=argparse.SUPPRESS)    # tests: a copy of the tree
    ap.add_argument("docs", nargs="*", help="documents to process (default: README.md and docs/**/*.md)")
    a = ap.parse_args(argv)
    global ROOT
    if a.root:
        ROOT = os.path.abspath(a.root)
        _json_cache.clear()
    if a.list:
        for name, fn in RENDERERS.items():
            print(f"{name:22s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    return run(a.check, a.docs or None)


if __name__ == "__main__":
    sys.exit(main())
