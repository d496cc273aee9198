"""README's quick start as a new user meets it: a clean clone, a fresh virtual environment, the first command.

    python bench/quickstart.py --json docs/quickstart.json [--workdir DIR] [--keep]

1. `git clone` of this checkout's committed HEAD (uncommitted work is not in it, as on a user's machine);
2. `python -m venv` (the interpreter running this script), nothing installed beyond what venv puts there;
3. the first ```bash block under README's "## Quick start", read from the clone, run in the clone with the
   venv first on PATH. Its `&&` steps run one after the other, each timed, stopping at the first failure,
   exactly as the shell would run the line;
4. afterwards, not timed: each `mq-deploy verify` step that ran once more with `--json`, so the figures
   the documents quote come from verify's own report (also when a check failed and stopped the command).

The machine is shared: the 1-minute load average is sampled through the run and recorded (`run.load`);
README states it beside the time. pip reads this machine's configuration (its index and wheel folders
are recorded), so the install time is that of this machine's package sources, not of a given network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmeta import ROOT, RunMeta, write


def readme_command(readme: str) -> str:
    """The first ```bash block after '## Quick start', joined into one line (backslash continuations)."""
    m = re.search(r"^## Quick start\b.*?^```bash\n(.*?)^```", readme, re.S | re.M)
    if not m:
        raise SystemExit("README.md has no ```bash block under '## Quick start'")
    return m.group(1).replace("\\\n", " ").strip()


def split_and(cmd: str) -> list[str]:
    """`a && b && c` -> [a, b, c]; refuses anything this simple split would get wrong."""
    if any(c in cmd for c in "\"'`$|;\n") or "||" in cmd:
        raise SystemExit(f"README's quick-start command is not a plain `&&` chain: {cmd!r}")
    return [s.strip() for s in cmd.split("&&")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--workdir", help="clone and venv go here (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the clone and the venv")
    a = ap.parse_args(argv)
    meta = RunMeta()
    work = a.workdir or tempfile.mkdtemp(prefix="mq-quickstart-")
    os.makedirs(work, exist_ok=True)
    clone, venv = os.path.join(work, "clone"), os.path.join(work, "venv")
    for p in (clone, venv):
        if os.path.exists(p):
            raise SystemExit(f"{p} exists: give an empty --workdir")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", ROOT, clone], check=True)
        with open(os.path.join(clone, "README.md"), encoding="utf-8") as f:
            command = readme_command(f.read())
        steps = split_and(command)
        pip_config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                    text=True).stdout.splitlines()
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        venv_s = time.perf_counter() - t
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYENV_VERSION")}
        env.update(PATH=os.path.join(venv, "bin") + os.pathsep + env.get("PATH", ""), VIRTUAL_ENV=venv)
        log_path = os.path.join(work, "quickstart.log")
        rows, rc = [], 0
        with open(log_path, "w") as log:
            for step in steps:
                load_at_start = round(os.getloadavg()[0], 2)
                t = time.perf_counter()
                p = subprocess.run(["bash", "-c", step], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
                rows.append({"command": step, "rc": p.returncode, "seconds": time.perf_counter() - t,
                             "load_at_start": load_at_start})
                print(f"{rows[-1]['seconds']:7.1f} s  rc {p.returncode}  load {load_at_start:5.2f}  {step}", flush=True)
                if p.returncode:
                    rc = p.returncode
                    break
        total = sum(r["seconds"] for r in rows)
        verify = []     # every verify step that ran (a failed check is exit 1: its report is the figure to read)
        ran = [r["command"] for r in rows if r["rc"] in (0, 1, 3)]   # verify: 1 failed, 3 within noise floor
        for i, step in enumerate(s for s in ran if s.startswith("mq-deploy verify ")):
            out = os.path.join(work, f"verify{i}.json")
            p = subprocess.run(["bash", "-c", f"{step} --json {out}"], cwd=clone, env=env, capture_output=True,
                               text=True)
            if p.returncode not in (0, 1, 3):
                raise SystemExit(f"{step} --json: exit {p.returncode}\n{p.stderr[-2000:]}")
            with open(out) as f:
                verify.append({"command": step, "report": json.load(f)})
        with open(log_path) as f:
            tail = f.read().splitlines()[-40:]
        print(f"README's first command: {'rc ' + str(rc) if rc else 'ok'}, {total:.1f} s (+ venv {venv_s:.1f} s)")
        if a.json:
            write(a.json, {"commit": head, "command": command, "rc": rc, "venv_seconds": venv_s,
                           "command_seconds": total, "steps": rows, "verify": verify, "pip_config": pip_config,
                           "log_tail": tail}, meta)
        return rc
    finally:
        if not a.keep:
            shutil.rmtree(work if not a.workdir else clone, ignore_errors=True)
            if a.workdir:
                shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
