"""The sandbox and executor of an earlier revision against today's, side by side in one run: the per-run overhead of
the sandbox for ``true`` and for a Python program that does nothing, and the canonical HumanEval-X programs (all 820,
2 workers), each measured in its own process, alternating, ``--rounds`` times.

The earlier revision (default ``5948032``, the last before the sandbox of issue 15) is checked out with
``git worktree`` and imported from there with this environment's packages.

    .venv/bin/python benchmarks/eval_baseline.py --data ../shared/humaneval-x --workers 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CANONICAL = """
import json, sys, time
from collections import Counter
from eval_harness.datasets import load_humaneval_x
from eval_harness.executor import execute_jobs, make_jobs
from eval_harness.sandbox import Limits
data, workers = sys.argv[1], int(sys.argv[2])
langs = ["python", "cpp", "java", "js", "go"]
probs = load_humaneval_x(data, langs)
by_id = {p.task_id: p for ps in probs.values() for p in ps}
samples = [{"task_id": p.task_id, "completion": p.canonical_solution, "kind": "generation", "language": lang,
            "key": p.task_id, "sample_index": 0} for lang, ps in probs.items() for p in ps]
jobs = make_jobs(samples, by_id)
rows = []
start = time.perf_counter()
execute_jobs(jobs, Limits(), workers, rows.append)
seconds = time.perf_counter() - start
per_lang = {lang: round(sum(r["run_s"] + r["compile_s"] for r in rows if r["language"] == lang), 2) for lang in langs}
print(json.dumps({"seconds": round(seconds, 2), "programs": len(rows),
                  "passed": sum(r["status"] == "passed" for r in rows),
                  "isolated": sum(bool(r.get("isolated")) for r in rows), "sandbox_seconds_per_language": per_lang}))
"""

OVERHEAD = """
import json, os, sys, tempfile, time
from pathlib import Path
from eval_harness import sandbox
runs = int(sys.argv[1])
new = hasattr(sandbox, "BACKENDS")
if new:
    from eval_harness.workdirs import work_dir
    def fresh():
        return work_dir(True)
else:
    def fresh():
        return tempfile.TemporaryDirectory(dir=sandbox.work_root())
def median_ms(cmd, script="", **kw):
    times = []
    for i in range(runs + 5):
        with fresh() as d:
            if script:
                Path(d, "main.py").write_text(script)
            t = time.perf_counter()
            r = sandbox.run_sandboxed(cmd, Path(d), sandbox.Limits(), **kw)
            times.append(time.perf_counter() - t)
            assert r.returncode == 0, (cmd, kw, r)
    return round(1000 * sorted(times[5:])[runs // 2], 2)
py = ["/usr/bin/python3", "-I", "main.py"]
out = {"true": median_ms(["true"]), "python": median_ms(py, "pass\\n")}
if new:
    for backend in sandbox.BACKENDS:
        out[f"true[{backend}]"] = median_ms(["true"], backend=backend)
        out[f"python[{backend}]"] = median_ms(py, "pass\\n", backend=backend)
    out["python[helper, warm]"] = median_ms(py, "pass\\n", backend="helper", warm=True)
print(json.dumps(out))
"""


def worktree(rev: str) -> Path:
    path = Path("/tmp") / f"codegeex-baseline-{rev}"
    if not (path / "eval_harness").is_dir():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(path), rev], cwd=REPO, check=True,
                       capture_output=True)
    return path


def measure(tree: Path, script: str, *args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r})\n{script}", *args],
                          cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{tree}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="5948032", help="the earlier revision")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "humaneval-x"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--overhead-runs", type=int, default=100)
    ap.add_argument("--skip-canonical", action="store_true")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()
    trees = {"baseline": worktree(args.baseline), "ours": REPO}
    report: dict[str, dict[str, list[dict[str, object]]]] = {name: {"overhead": [], "canonical": []} for name in trees}
    for rnd in range(args.rounds):
        for name, tree in trees.items():
            report[name]["overhead"].append(measure(tree, OVERHEAD, str(args.overhead_runs)))
            print(rnd, name, "overhead", json.dumps(report[name]["overhead"][-1]), flush=True)
        for name, tree in ([] if args.skip_canonical else list(trees.items())):
            report[name]["canonical"].append(measure(tree, CANONICAL, str(Path(args.data).resolve()),
                                                     str(args.workers)))
            print(rnd, name, "canonical", json.dumps(report[name]["canonical"][-1]), flush=True)
    summary = {}
    if not args.skip_canonical:
        base = statistics.median(float(r["seconds"]) for r in report["baseline"]["canonical"])  # type: ignore[arg-type]
        ours = statistics.median(float(r["seconds"]) for r in report["ours"]["canonical"])  # type: ignore[arg-type]
        summary = {"canonical_baseline_s": base, "canonical_ours_s": ours, "ours_over_baseline": round(ours / base, 3)}
    print(json.dumps({"baseline": args.baseline, "workers": args.workers, "report": report, "summary": summary},
                     indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"report": report, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
