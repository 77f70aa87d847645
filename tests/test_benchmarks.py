"""The benchmark scripts whose claim is a check, not a speed: run small, in a fresh process.

Speed is never asserted here (README: benchmarks print ratios, tests do not time); what is checked is
that the scripts run on this checkout and that what they prove holds.
"""

import json
import subprocess
import sys

from tests.conftest import REPO


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> args...` from the repo root; its completed process (output as text)."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_two_shards_merged_by_score_return_one_index_top_k():
    """docs/SCALING.md's claim: exact search over 2 exported shards, merged by score, is one index's top-k."""
    done = run_benchmark("sharded_retrieval.py", "--n", "3000", "--dim", "16", "--queries", "50",
                         "--clusters", "20")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "in 2 shards of" in done.stdout
    assert "same ids in the same order for 100.0% of queries, same set for 100.0%" in done.stdout
    assert "merged shards 1.0000" in done.stdout  # each small shard is an exact ScaNN index


def cold_start_run(seed, warm, cold, **extra):
    """One run's figures as benchmarks/cold_start.py keeps them in results.json."""
    return {"seed": seed, "seconds": 60.0, "epochs": 6, "warm": warm, "cold": cold, "cold_pixel_knn": 0.1,
            "cold_random": 0.02, "cold_vs_pixel_knn": cold / 0.1, "eval_all": 0.5, "eval_cold": 0.9, **extra}


def test_cold_start_summary_checks_the_targets_from_results_json(tmp_path):
    results = {
        # written before the warm baseline was kept: its cell prints "-"
        "graph_off": {"runs": [cold_start_run(1, 0.60, 0.80), cold_start_run(2, 0.62, 0.81)]},
        "content_pixels": {"runs": [cold_start_run(s, 0.61, c, warm_pixel_knn=0.3, warm_vs_pixel_knn=2.0)
                                    for s, c in ((1, 0.90), (2, 0.91))]},
        "pbm": {"runs": [cold_start_run(1, 0.50, 0.805), cold_start_run(2, 0.50, 0.815)]},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    done = run_benchmark("cold_start.py", "--workdir", str(tmp_path), "--summarize", timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if "seeds)" in line}
    assert set(rows) == {"graph_off", "content_pixels", "pbm"}
    assert "0.610 +/- 0.000  2.00 +/- 0.00" in rows["content_pixels"] and " -  " in rows["graph_off"]
    # gain 0.10 against 3 x spread 0.03, warm not lower: met; pbm gains 0.01 and loses warm recall: not met
    assert "content_pixels vs graph_off: cold 0.905 vs 0.805 (gain +0.100, 3 x spread 0.030)" in done.stdout
    assert "warm 0.610 vs 0.610: met" in done.stdout
    assert "pbm vs graph_off: cold 0.810 vs 0.805 (gain +0.005, 3 x spread 0.030); warm 0.500 vs 0.610: NOT met" \
        in done.stdout
