"""bench/report.py: the documents agree with their JSONs, and a disagreement is caught in one line.

Each case runs the real script in a child process on a copy of the documents (README.md and docs/ copied,
everything else linked), changes one thing, and checks the exit status and the one line it prints.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "bench", "report.py")


def report(*args, root=None):
    cmd = [sys.executable, REPORT, *args] + (["--root", str(root)] if root else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path):
    """README.md and docs/ copied (they get edited), every other top-level entry a symlink to the checkout."""
    for name in os.listdir(ROOT):
        if name in (".git",):
            continue
        src = os.path.join(ROOT, name)
        if name in ("README.md", "docs"):
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, tmp_path / name)
        else:
            os.symlink(src, tmp_path / name)
    return tmp_path


def one_line(p):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    print(p.stderr)
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_check_passes_on_the_tree():
    p = report("--check")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""


def test_check_passes_on_an_unchanged_copy(tree):
    p = report("--check", root=tree)
    assert p.returncode == 0, p.stderr


def _edit(path, old, new, count=1):
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, count), encoding="utf-8")
    return text


def _first_region_value(text):
    """The first inline region's text that holds a digit, and the line it is on."""
    for m in re.finditer(r"<!-- report:\S+[^>]*-->([^<\n]*\d[^<\n]*)<!-- /report -->", text):
        return m.group(0), m.group(1), text.count("\n", 0, m.start()) + 1
    raise AssertionError("no inline region with a figure")


def test_an_altered_figure_fails_naming_the_line_and_the_rewrite_restores_it(tree):
    doc = tree / "docs" / "results.md"
    region, figure, line = _first_region_value(doc.read_text(encoding="utf-8"))
    altered = re.sub(r"\d", lambda m: str((int(m.group(0)) + 1) % 10), figure, count=1)
    original = _edit(doc, region, region.replace(figure, altered))
    p = report("--check", root=tree)
    assert p.returncode == 1
    msg = one_line(p)
    assert msg.startswith(f"docs/results.md:{line}:"), msg
    assert altered[:20] in msg or figure[:20] in msg
    # the rewrite puts the JSON's figure back, and then the check passes
    assert report(root=tree).returncode == 0
    assert doc.read_text(encoding="utf-8") == original
    assert report("--check", root=tree).returncode == 0


def test_a_json_that_changed_fails_the_document_that_quotes_it(tree):
    path = tree / "docs" / "ptq_vim-fashion-mnist.json"
    _edit(path, '"value": 0.917', '"value": 0.927')
    msg = one_line(report("--check", root=tree))
    assert msg.startswith("docs/results.md:"), msg
    assert "92.70" in msg or "92.7" in msg


def test_a_missing_cited_file_fails(tree):
    os.remove(tree / "docs" / "ptq_minmax_mamba-byte-lm.json")
    p = report("--check", root=tree)
    assert p.returncode == 1
    msg = one_line(p)
    assert "docs/ptq_minmax_mamba-byte-lm.json" in msg and "no such file" in msg, msg


def test_a_link_to_a_missing_file_fails(tree):
    _edit(tree / "docs" / "tensorrt.md", "\n## Where each step lives",
          "\nSee [the notes](notes/missing.md).\n\n## Where each step lives")
    msg = one_line(report("--check", root=tree))
    assert msg.startswith("docs/tensorrt.md:") and "notes/missing.md" in msg, msg


@pytest.mark.parametrize("cited", ["/work/shared/notes/peers-130m.md", "DESIGN.md"])
def test_a_path_outside_the_repository_fails(tree, cited):
    _edit(tree / "docs" / "serving.md", "\n## What the repository holds",
          f"\nThe measurements are in {cited}.\n\n## What the repository holds")
    msg = one_line(report("--check", root=tree))
    assert msg.startswith("docs/serving.md:") and cited in msg, msg


def test_a_hand_typed_figure_beside_a_cited_json_fails(tree):
    _edit(tree / "docs" / "results.md", "\n## Quantization cost",
          "\nRTN W8A8 loses 0.42 points on the Vim (`docs/ptq_vim-fashion-mnist.json`).\n\n## Quantization cost")
    msg = one_line(report("--check", root=tree))
    assert msg.startswith("docs/results.md:") and "'0.42 points'" in msg, msg


def test_a_broken_json_is_one_line(tree):
    (tree / "docs" / "forward.json").write_text("{not json", encoding="utf-8")
    msg = one_line(report("--check", root=tree))
    assert "docs/forward.json" in msg and "not a readable JSON" in msg, msg


def _render(tree, body, name="docs/_probe.md"):
    """Write a probe document holding `body` (regions with empty text), let report.py fill it, return it."""
    (tree / name).write_text(body, encoding="utf-8")
    p = report(name, root=tree)
    assert p.returncode == 0, p.stderr
    return (tree / name).read_text(encoding="utf-8")


def _set_pair(path, bits, diff, lo, hi):
    import json

    d = json.loads(path.read_text(encoding="utf-8"))
    for p in d["pairs"]:
        if p["bits"] == bits and (p.get("a", "mambaquant"), p.get("b", "quarot")) == ("mambaquant", "quarot"):
            p["diff"], p["diff_ci95"] = diff, [lo, hi]
    path.write_text(json.dumps(d), encoding="utf-8")


def test_ptq_goals_verdicts_follow_the_json(tree):
    src = tree / "docs" / "ptq_mamba2-byte-lm.json"
    body = "<!-- report:ptq_goals docs/ptq_mamba2-byte-lm.json -->\n<!-- /report -->\n"
    import json

    d = json.loads(src.read_text(encoding="utf-8"))
    row = next(r for r in d["rows"] if r["recipe"] == "mambaquant" and r["bits"] == "w8a8")
    row["relative"], row["relative_ci95"] = 0.0061, [0.004, 0.008]     # past the 0.5 % goal
    for p in d["pairs"]:
        p["diff"], p["diff_ci95"] = -0.001, [-0.002, -0.0001]            # MambaQuant ahead everywhere
    src.write_text(json.dumps(d), encoding="utf-8")
    text = _render(tree, body)
    print(text)
    assert "- W8A8 costs <= 0.5 % bits/byte: **missed**, mambaquant +0.61 % [+0.40, +0.80] (0.11 % over)." in text
    assert "mambaquant >= quarot at every setting (mambaquant minus quarot, bits/byte): **met**" in text
    # QuaRot ahead at W4A8 only, interval across 0: named, with its interval, as not resolved
    _set_pair(src, "w4a8", 0.0019, -0.0016, 0.0055)
    text = _render(tree, body)
    print(text)
    assert "**not at 1 of 5**: quarot is ahead at W4A8 +0.0019 [-0.0016, +0.0055] (interval across 0)" in text


def test_ptq_pair_picks_the_pairing_it_names(tree):
    import json

    src = "docs/ptq_ssm-scales_mamba2-byte-lm.json"
    d = json.loads((tree / src).read_text(encoding="utf-8"))
    p = next(p for p in d["pairs"] if (p["a"], p["b"], p["bits"]) == ("mambaquant/grouped", "mambaquant", "w8a8"))
    lo, hi = p["diff_ci95"]
    text = _render(tree, f"<!-- report:ptq_pair {src} bits=w8a8 a=mambaquant/grouped b=mambaquant --><!-- /report -->\n")
    print(text)
    assert f"-->{p['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]<!--" in text
    # the file's table names each pairing, since they are not all MambaQuant minus QuaRot
    table = _render(tree, f"<!-- report:ptq_table {src} -->\n<!-- /report -->\n")
    print(table)
    assert f"| mambaquant/grouped minus mambaquant | W8A8 | {p['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] |" in table
    assert "MambaQuant minus QuaRot" not in table
    # the default pairing (MambaQuant minus QuaRot) is not in this file: one line naming what is missing
    (tree / "docs" / "_probe.md").write_text(f"text\n<!-- report:ptq_pair {src} bits=w8a8 -->x<!-- /report -->\n",
                                             encoding="utf-8")
    msg = one_line(report("--check", "docs/_probe.md", root=tree))
    assert msg.startswith("docs/_probe.md:2:") and "0 pairs mambaquant minus quarot at w8a8" in msg, msg


def test_ptq_ladder_steps_are_row_differences_across_sources(tree):
    import json

    main, mm = "docs/ptq_mamba2-byte-lm.json", "docs/ptq_minmax_mamba2-byte-lm.json"
    steps = "RTN@0@rtn;QuaRot@0@quarot;MambaQuant, min-max@1@mambaquant;MambaQuant@0@mambaquant"
    text = _render(tree, f"<!-- report:ptq_ladder {main} {mm} 'steps={steps}' bits=w8a8,w4a8 d=3 -->\n"
                         "<!-- /report -->\n")
    print(text)
    rows = {}
    for src, recipe in ((main, "rtn"), (main, "quarot"), (mm, "mambaquant"), (main, "mambaquant")):
        d = json.loads((tree / src).read_text(encoding="utf-8"))
        rows[(src, recipe)] = next(r for r in d["rows"] if (r["recipe"], r["bits"]) == (recipe, "w4a8"))
    q, m = rows[(main, "quarot")], rows[(mm, "mambaquant")]
    lo, hi = m["relative_ci95"]
    line = next(ln for ln in text.splitlines() if ln.startswith("| MambaQuant, min-max | "))
    assert line.endswith(f"| {m['relative'] * 100:+.2f} % [{lo * 100:+.2f}, {hi * 100:+.2f}] "
                         f"(step {(m['relative'] - q['relative']) * 100:+.3f} %) |"), line
    assert text.count("(step ") == 6            # every row after the first, at both bit widths
    (tree / "docs" / "_probe.md").write_text(f"<!-- report:ptq_ladder {main} steps=RTN@3@rtn -->\n<!-- /report -->\n",
                                             encoding="utf-8")
    msg = one_line(report("--check", "docs/_probe.md", root=tree))
    assert msg.startswith("docs/_probe.md:1:") and "LABEL@SOURCE_INDEX@RECIPE" in msg, msg


def test_a_hand_typed_figure_after_links_is_named_exactly(tree):
    # link targets are blanked, not removed, so the figure found is the one in the text (and on its line)
    _edit(tree / "README.md", "\n## Benchmarks\n",
          "\nSee [the results](docs/results.md) and [serving](docs/serving.md): RTN loses 0.42 points on the "
          "Vim (`docs/ptq_vim-fashion-mnist.json`).\n\n## Benchmarks\n")
    msg = one_line(report("--check", "README.md", root=tree))
    assert msg.startswith("README.md:") and "'0.42 points'" in msg, msg
