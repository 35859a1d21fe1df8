"""CI check of benchmarks.gpu_suite: ``--smoke`` runs every section's code at tiny sizes on a CPU,
from the source tree the way the GPU machine runs it (no installed alit_fast.kernels package)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks._env import REPO
from benchmarks.gpu_suite import SECTIONS

# drop the editable install's import hook so alit_fast and its kernels come from the bare tree
_BARE_TREE = (
    "import sys, runpy; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
    "sys.argv = ['gpu_suite'] + sys.argv[1:]; "
    "runpy.run_module('benchmarks.gpu_suite', run_name='__main__', alter_sys=True)"
)


def test_gpu_suite_smoke(tmp_path):
    # the smoke run is the CPU path (Triton interpreted), even where a GPU is present
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _BARE_TREE, "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert set(report["sections"]) == set(SECTIONS)
    broken = {n: s["status"] + "\n" + (s.get("error") or "") for n, s in report["sections"].items() if s["status"] != "ok"}
    assert not broken, broken
    rows = [r for s in report["sections"].values() for r in s["rows"]]
    assert not [r for r in rows if r["status"] in ("error", "fail")], [r for r in rows if r["status"] in ("error", "fail")]
    assert all(r["status"] == "pass" for name in ("check-attention", "check-vq", "check-rollout")
               for r in report["sections"][name]["rows"])
    assert report["meta"]["kernels_package"] == "source tree"
    # every timing section produced numbers (adaptive encoding may wait for its API), and the
    # printed report ends with the summary against the goals
    for name in ("attention", "vq", "block", "rollout", "adaptive-encode", "train", "train-compiled"):
        rows = report["sections"][name]["rows"]
        skipped = name == "adaptive-encode" and rows and all(r["status"] == "skipped" for r in rows)
        assert skipped or any(r.get("ms") for r in rows), name
    # stage 2 ran on both backends, stopped and resumed (a failed check is a "fail" row, caught above)
    stage2 = report["sections"]["train-stage2"]["rows"]
    assert sorted(r["provider"] for r in stage2) == ["torch", "triton"] and all(r.get("images_per_s") for r in stage2)
    assert "## Summary against the goals" in markdown
    assert proc.stdout.rstrip().endswith(markdown.rstrip().splitlines()[-1])
    print(f"gpu_suite --smoke took {seconds:.1f} s")
