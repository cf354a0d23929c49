"""The phase diagram end to end (issue 21's target: under 120 s), cold and warm, measured in one run on all cores.

Runs ``experiments/phase_diagram.py`` in full mode (24 chain lengths n = 4..256 x 33 masses, t1 = 1e8) twice in fresh
processes, writing into a temporary folder (the committed figure is never touched): first with an empty persistent
compilation cache (cold: every bucket's learning-time program compiles), then with the cache that run filled (warm: a
new process loads them).  Prints the wall seconds of each and the script's own split (its JSON: seconds per n; the
first n of each bucket holds that bucket's compile or load).
Before/after: ``--baseline REV`` runs the cold case on that revision's tree (``git archive``) too, in the same run.
Run: python benchmarks/bench_phase_diagram.py [--baseline REV]
"""

import os

os.environ.setdefault("GRADFLOW_BENCH_ALL_CORES", "1")  # the target is stated for both cores

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _common  # noqa: E402,F401
from _common import check, finish, header, table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET_S = 120.0


def run_once(tree: str, cache: str, out: str) -> tuple[float, dict]:
    """Wall seconds of the full phase diagram in a fresh process on ``tree`` with the cache folder ``cache``, and its JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRADFLOW_NO_CACHE", "XLA_FLAGS", "PYTHONPATH")}
    env.update(GRADFLOW_CACHE_DIR=cache, PYTHONPATH=tree)
    start = time.perf_counter()
    script = os.path.join(tree, "experiments", "phase_diagram.py")
    subprocess.run([sys.executable, script, "--out", out], env=env, check=True, capture_output=True, cwd=tree)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "phase_diagram.json")) as handle:
        return seconds, json.load(handle)


def main():
    parser = argparse.ArgumentParser(description="the phase diagram end to end (issue 21)")
    parser.add_argument("--baseline", default=None, help="git revision whose cold run is measured too")
    args = parser.parse_args()
    header("bench_phase_diagram: the phase diagram end to end (issue 21)")
    work = tempfile.mkdtemp(prefix="gradflow-bench-phase-")
    try:
        rows = []
        if args.baseline:
            tree = os.path.join(work, "baseline")
            os.makedirs(tree)
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            seconds, data = run_once(tree, os.path.join(work, "cache-baseline"), os.path.join(work, "out-baseline"))
            rows.append((f"cold ({args.baseline})", f"{seconds:.1f}", f"{data['seconds_total']:.1f}", data.get("programs", "-")))
        cache = os.path.join(work, "cache")
        cold, data = run_once(ROOT, cache, os.path.join(work, "out-cold"))
        rows.append(("cold (this tree)", f"{cold:.1f}", f"{data['seconds_total']:.1f}", data.get("programs", "-")))
        warm, data = run_once(ROOT, cache, os.path.join(work, "out-warm"))
        rows.append(("warm (this tree)", f"{warm:.1f}", f"{data['seconds_total']:.1f}", data.get("programs", "-")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table(rows, ("run (fresh process)", "wall s", "compute s (its JSON)", "programs (its JSON)"))
    check(f"phase diagram end to end, cold cache, under {TARGET_S:.0f} s", cold < TARGET_S, f"{cold:.1f} s")
    check(f"phase diagram end to end, warm cache, under {TARGET_S:.0f} s", warm < TARGET_S, f"{warm:.1f} s")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
