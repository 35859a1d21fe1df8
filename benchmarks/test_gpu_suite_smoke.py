"""CI check of benchmarks.gpu_suite: ``--smoke`` runs every section of both parts at tiny sizes on a
CPU, from the source tree the way the GPU machine runs it (no installed alit_fast.kernels package);
``--plan`` shows part 1 inside its budget with the headline sections first; a spent budget stops
the run cleanly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from benchmarks import gpu_plan
from benchmarks._env import REPO
from benchmarks.gpu_suite import BUDGET, ORDER, SECTIONS

# drop the editable install's import hook so alit_fast and its kernels come from the bare tree
_BARE_TREE = (
    "import sys, runpy; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
    "sys.argv = ['gpu_suite'] + sys.argv[1:]; "
    "runpy.run_module('benchmarks.gpu_suite', run_name='__main__', alter_sys=True)"
)


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # the smoke run is the CPU path (Triton interpreted), even where a GPU is present
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", _BARE_TREE, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_suite_smoke(tmp_path):
    t0 = time.time()
    proc = _run("--smoke", "--out", str(tmp_path))
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
    # every timing section produced numbers, auto too where alit_fast offers that backend
    for name in ("attention", "attention-d64", "vq", "block", "rollout", "rollout-graph", "adaptive-encode",
                 "encode-compiled", "train", "train-compiled", "auto"):
        rows = report["sections"][name]["rows"]
        skipped = name == "auto" and [r["status"] for r in rows] == ["skipped"]
        assert skipped or any(r.get("ms") for r in rows), name
    assert {r["provider"] for r in report["sections"]["vq"]["rows"]} == {"triton", "chunked", "cublas-tf32", "naive"}
    encode = report["sections"]["adaptive-encode"]["rows"]
    assert all(r["mean_tokens"] > 0 and r["mean_l1"] > 0 for r in encode)
    rollout = report["sections"]["check-rollout"]["rows"]
    assert all(0.0 <= r["errors"]["index_agreement_min"] <= 1.0 for r in rollout)
    # stage 2 ran on both backends, stopped and resumed (a failed check is a "fail" row, caught above)
    stage2 = report["sections"]["train-stage2"]["rows"]
    assert sorted(r["provider"] for r in stage2) == ["torch", "triton"] and all(r.get("images_per_s") for r in stage2)
    assert "## Summary against the goals" in markdown
    # the report, then the one line on what the budget left out
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1] == "gpu_suite part 1: every section ran" and lines[-2] == markdown.rstrip().splitlines()[-1]
    print(f"gpu_suite --smoke took {seconds:.1f} s")


def test_a_spent_budget_skips_sections_and_exits_zero(tmp_path):
    proc = _run("--smoke", "--sections", "environment,vq,auto", "--budget", "0", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1] == "gpu_suite part 1: skipped for the budget: environment, vq, auto"
    report = json.loads((tmp_path / "results.json").read_text())
    assert all(s["status"].startswith("skipped: planned") for s in report["sections"].values())


def test_the_watchdog_stops_a_stuck_section_with_its_own_exit_code(tmp_path):
    """Past --hard-limit the files are written and the exit code is 3, not 124 (the device tool's
    time-out code)."""
    proc = _run("--smoke", "--sections", "check-attention,vq", "--hard-limit", "1", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hard limit of 1 s reached in section 'check-attention'; not run: vq" in proc.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["sections"]["check-attention"]["status"] == "killed at the hard limit of 1 s"


def test_the_plan_fits_part_1_in_its_budget_with_the_headline_sections_first():
    rows = [p for p in gpu_plan.plans(gpu_plan.COMPILE_S) if 1 in p.parts]
    assert [p.name for p in rows] == ORDER[1]
    assert ORDER[1][1:6] == ["check-attention", "check-vq", "check-rollout", "adaptive-encode", "train"]
    assert sum(p.seconds for p in rows) < BUDGET[1] == 420
    # the kernels compile once per dtype, head dim and lengths-or-not: the check compiles them all,
    # every autotune candidate of fwd, dk/dv and dq for bf16 / fp16 x uniform / mixed
    from alit_fast.kernels import attention as kern

    check = next(p for p in rows if p.name == "check-attention")
    per_variant = sum(len(kern.candidates(k, (9, 0), torch.bfloat16, "ieee", 128)) for k in ("fwd", "dkdv", "dq"))
    assert check.compiles >= 4 * per_variant
    assert sum(p.compiles for p in rows) < 100
    # the timed sweep reuses them: only new autotune keys (lengths), no new compiles
    assert next(p for p in rows if p.name == "attention").compiles == 0


def test_the_run_budgets_with_the_current_plan():
    for part in (1, 2):
        computed = {p.name: round(p.seconds) for p in gpu_plan.plans(gpu_plan.COMPILE_S) if part in p.parts}
        table = gpu_plan.PLANNED_S[part]
        # a kernel edit that moves a section by a few compiles need not stop CI; a new plan does
        off = {n: (table.get(n), s) for n, s in computed.items() if abs(table.get(n, -1e9) - s) > max(5, 0.15 * s)}
        assert set(table) == set(computed) and not off, f"part {part}: update gpu_plan.PLANNED_S to {computed}"


def test_every_section_is_in_a_part():
    assert sorted(set(ORDER[1]) | set(ORDER[2])) == sorted(SECTIONS)


def test_run_gpu_sh_passes_the_part_and_runs_no_cpu_only_step(tmp_path):
    script = (REPO / "benchmarks" / "run_gpu.sh").read_text()
    assert "aot_check --" not in script and "timeout" not in script
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, OUT=str(tmp_path), PATH=path, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--part", "2", "--smoke",
                           "--sections", "environment,ceilings"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert log.rstrip().endswith("gpu_suite part 2: every section ran")
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["part"] == 2
