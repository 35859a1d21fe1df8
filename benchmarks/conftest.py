"""pytest-benchmark plumbing: full sizes on a CUDA machine, ``Sizes.cpu()`` (and the Triton
interpreter) elsewhere. Each case reports throughput and peak memory in ``benchmark.extra_info``;
CI runs the suite once per case with ``--benchmark-disable``.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

import benchmarks  # noqa: F401 - sets TRITON_INTERPRET before any kernel is imported
from benchmarks.cases import MiB, Case, Sizes, _clear, _sync, default_device, peak_memory

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PLUGIN = True
except ImportError:  # the GPU image may lack it; keep the cases runnable as plain tests
    HAVE_PLUGIN = False


if not HAVE_PLUGIN:

    def pytest_addoption(parser):
        parser.addoption("--benchmark-disable", action="store_true", help="(pytest-benchmark is not installed)")

    class _OneShot:
        """The part of pytest-benchmark's fixture the suite uses: runs the target once."""

        def __init__(self) -> None:
            self.extra_info: dict = {}
            self.group = None
            self.disabled = True

        def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
            if setup is not None:
                setup()
            return target(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _OneShot()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return default_device()


@pytest.fixture(scope="session")
def sizes(device) -> Sizes:
    return Sizes.for_device(device)


@pytest.fixture(autouse=True)
def _one_cpu_thread(device):
    """One torch thread on a CPU: the CI box has two shared cores, and two OpenMP threads
    contending with other jobs made a tiny training step take seconds instead of 30 ms."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def run_case(benchmark, device, sizes):
    """Measure a Case: its peak memory in one run, then timed rounds; fills extra_info."""

    def run(bench_case: Case, group: str, *, kernel: bool = False, **info) -> dict:
        case = bench_case
        times: list[float] = []
        peaks: list[int | None] = []

        def measured():
            t0 = time.perf_counter()
            peaks.append(peak_memory(case, device))
            times.append(time.perf_counter() - t0)

        def target():
            t0 = time.perf_counter()
            case.fn()
            _sync(device)
            times.append(time.perf_counter() - t0)

        benchmark.group = group
        if getattr(benchmark, "disabled", False):
            # a smoke run: one call gives the peak memory and a rough time
            benchmark.pedantic(measured)
            rounds = 1
        else:
            measured()  # also the first warm-up
            warm, rounds = sizes.kernel_reps if kernel else sizes.model_reps
            with case.context():
                benchmark.pedantic(target, setup=lambda: _clear(case.grads), rounds=rounds, warmup_rounds=max(0, warm - 1))
        seconds = statistics.median(times[-rounds:])
        peak = peaks[0]
        extra = dict(info)
        extra.update(device=str(device), sizes=sizes.name, median_ms=round(seconds * 1e3, 4))
        extra["peak_mib"] = None if peak is None else round(peak / MiB, 3)
        if case.flops:
            extra["tflops"] = round(case.flops / seconds / 1e12, 6)
        if case.min_bytes:
            extra["gb_per_s"] = round(case.min_bytes / seconds / 1e9, 4)
        if case.images:
            extra["images_per_s"] = round(case.images / seconds, 4)
        if case.note:
            extra["note"] = case.note
        benchmark.extra_info.update(extra)
        return extra

    return run


@pytest.fixture()
def calibrated_tiny(tmp_path) -> "Path":
    """A seeded tiny model file with a pixel-L1 calibration (what fast-pixel-l1 rows need), for the
    scripts' smoke runs."""
    from alit_fast import ALIT
    from alit_fast.config import VQGANConfig
    from alit_fast.inference.calibration import PixelL1Calibration
    from alit_fast.testing import tiny_config

    torch.manual_seed(0)
    model = ALIT(tiny_config(vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48)))
    model.pixel_l1_calibration = PixelL1Calibration(coef=(0.0, 1.0, 0.1, 0.0), cell=4)
    path = tmp_path / "tiny.safetensors"
    model.save(str(path))
    return path
