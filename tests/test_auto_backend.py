"""The ``auto`` backend: picks from measured timings, caches per key in memory and on disk, never
times while torch.compile traces or a CUDA graph is captured, falls back as documented, and is
``torch`` on a CPU. Timings come from a fake timer; "the GPU" is the CPU with ``auto.active``
patched on (the Triton candidate runs in the interpreter)."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import stat

import pytest
import torch

from alit_fast import ALIT
from alit_fast.io import checkpoint, pretrained
from alit_fast.ops import BACKENDS, attention, auto, vq_nearest

attention_mod = importlib.import_module("alit_fast.ops.attention")  # the package re-exports the function
vq_mod = importlib.import_module("alit_fast.ops.vq")
from alit_fast.testing import count_syncs, tiny_config


@pytest.fixture(autouse=True)
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv("ALIT_FAST_AUTO_CACHE", str(path))
    auto.clear_memory()
    auto._WARNED.clear()
    yield path
    auto.clear_memory()


class FakeTimer:
    """Answers ``ms[name]`` for candidate ``name`` (running it first when ``run``); records which
    candidates it timed."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self.run = False
        self.timed: list[str] = []

    def __call__(self, name, fn):
        if self.run:
            fn()  # raises for a candidate that refuses the inputs
        self.timed.append(name)
        return self.ms[name]


@pytest.fixture
def timer(monkeypatch):
    fake = FakeTimer()
    monkeypatch.setattr(auto, "measure", fake)
    return fake


def _calls(*names):
    return lambda: {name: (lambda: None) for name in names}


KEY = ("attention", "bfloat16", 64, 10, False, "Fake GPU")


def test_choose_picks_the_fastest_measured_candidate(timer):
    timer.ms = {"triton": 2.0, "sdpa-cudnn": 1.0, "sdpa-flash": 1.5}
    assert auto.choose(KEY, _calls("triton", "sdpa-cudnn", "sdpa-flash"), "triton") == "sdpa-cudnn"
    assert sorted(timer.timed) == ["sdpa-cudnn", "sdpa-flash", "triton"]


def test_choice_is_cached_in_memory_per_key(timer):
    timer.ms = {"triton": 1.0, "sdpa-cudnn": 2.0}
    assert auto.choose(KEY, _calls("triton", "sdpa-cudnn"), "sdpa-cudnn") == "triton"
    timer.timed.clear()
    assert auto.choose(KEY, _calls("triton", "sdpa-cudnn"), "sdpa-cudnn") == "triton"
    assert timer.timed == []  # no second timing for the same key
    other = KEY[:3] + (11,) + KEY[4:]  # another length bucket is another key
    timer.ms = {"triton": 3.0, "sdpa-cudnn": 2.0}
    assert auto.choose(other, _calls("triton", "sdpa-cudnn"), "triton") == "sdpa-cudnn"
    assert sorted(timer.timed) == ["sdpa-cudnn", "triton"]


def test_choice_is_cached_on_disk_for_a_new_process(timer, cache_file):
    timer.ms = {"triton": 1.0, "sdpa-flash": 2.0}
    auto.choose(KEY, _calls("triton", "sdpa-flash"), "sdpa-flash")
    assert json.loads(cache_file.read_text()) == {"|".join(map(str, KEY)): "triton"}
    auto.clear_memory()  # as a new process would start
    timer.timed.clear()
    assert auto.choose(KEY, _calls("triton", "sdpa-flash"), "sdpa-flash") == "triton"
    assert timer.timed == []


def test_default_cache_file_lies_beside_tritons_cache_keyed_by_versions(monkeypatch, tmp_path):
    monkeypatch.delenv("ALIT_FAST_AUTO_CACHE")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    path = auto.cache_path()
    assert path.startswith(str(tmp_path / "triton")) and torch.__version__.split("+")[0] in path


def test_corrupt_cache_file_is_ignored_and_replaced(timer, cache_file):
    cache_file.write_text("{ not json")
    timer.ms = {"triton": 1.0, "sdpa-flash": 2.0}
    with pytest.warns(RuntimeWarning, match="unreadable choice cache"):
        assert auto.choose(KEY, _calls("triton", "sdpa-flash"), "sdpa-flash") == "triton"
    assert json.loads(cache_file.read_text())["|".join(map(str, KEY))] == "triton"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_keeps_choices_in_memory(timer, cache_file):
    folder = cache_file.parent
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        timer.ms = {"triton": 1.0, "sdpa-flash": 2.0}
        with pytest.warns(RuntimeWarning, match="stay in memory"):
            assert auto.choose(KEY, _calls("triton", "sdpa-flash"), "sdpa-flash") == "triton"
    finally:
        folder.chmod(stat.S_IRWXU)
    assert not cache_file.exists()


def test_unwritable_cache_path_keeps_choices_in_memory(timer, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("ALIT_FAST_AUTO_CACHE", str(blocker / "choices.json"))  # a folder that is a file
    timer.ms = {"triton": 1.0, "sdpa-flash": 2.0}
    with pytest.warns(RuntimeWarning, match="stay in memory"):
        assert auto.choose(KEY, _calls("triton", "sdpa-flash"), "sdpa-flash") == "triton"
    timer.timed.clear()
    assert auto.choose(KEY, _calls("triton", "sdpa-flash"), "sdpa-flash") == "triton"
    assert timer.timed == []


def test_never_times_while_compiling_uses_default_then_cached(timer, monkeypatch):
    timer.ms = {"triton": 1.0, "sdpa-cudnn": 2.0}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert auto.choose(KEY, _calls("triton", "sdpa-cudnn"), "sdpa-cudnn") == "sdpa-cudnn"
    assert timer.timed == [] and auto.cached(KEY) is None  # the default is not remembered as measured
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert auto.choose(KEY, _calls("triton", "sdpa-cudnn"), "sdpa-cudnn") == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    timer.timed.clear()
    assert auto.choose(KEY, _calls("triton", "sdpa-cudnn"), "sdpa-cudnn") == "triton"  # cached choice
    assert timer.timed == []


def test_never_times_during_cuda_graph_capture(timer, monkeypatch):
    timer.ms = {"triton": 1.0, "sdpa-cudnn": 2.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert auto.choose(KEY, _calls("triton", "sdpa-cudnn"), "sdpa-cudnn") == "sdpa-cudnn"
    assert timer.timed == []


def test_candidate_that_refuses_the_inputs_is_left_out(timer):
    def refuses():
        raise RuntimeError("No available kernel")

    timer.run = True
    timer.ms = {"sdpa-flash": 0.5, "triton": 1.0}
    with pytest.warns(RuntimeWarning, match="sdpa-flash left out"):
        assert auto.choose(KEY, lambda: {"sdpa-flash": refuses, "triton": lambda: None}, "sdpa-cudnn") == "triton"


def test_nothing_measurable_falls_back_to_the_default(timer):
    assert auto.choose(KEY, lambda: {}, "sdpa-cudnn") == "sdpa-cudnn"
    assert auto.cached(KEY) is None


def test_static_defaults_are_triton_for_ragged_and_cudnn_for_uniform():
    assert attention_mod.auto_static_default(torch.tensor([3, 5], dtype=torch.int32)) == "triton"
    assert attention_mod.auto_static_default(None) == "sdpa-cudnn"
    assert vq_mod.VQ_STATIC_DEFAULT == "triton"


def _qkv(B=2, L=20, H=1, D=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, L, H, D, generator=g) for _ in range(3)]


def test_auto_is_torch_on_a_cpu_and_times_nothing(timer):
    q, k, v = _qkv()
    lengths = torch.tensor([20, 13], dtype=torch.int32)
    assert torch.equal(attention(q, k, v, lengths, backend="auto"), attention(q, k, v, lengths, backend="torch"))
    z, book = torch.randn(37, 8), torch.randn(16, 8)
    got, want = vq_nearest(z, book, normalize=False, backend="auto"), vq_nearest(z, book, normalize=False, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert timer.timed == []


@pytest.mark.parametrize("fastest", ["triton", "sdpa-flash"])
def test_attention_auto_runs_the_measured_fastest(timer, monkeypatch, fastest):
    # the CPU playing a GPU: its SDPA takes flash only (cuDNN and efficient refuse and are left
    # out); the Triton candidate runs in the interpreter
    monkeypatch.setattr(auto, "active", lambda device: True)
    timer.run = True
    timer.ms = {"triton": 1.0, "sdpa-flash": 2.0, "sdpa-cudnn": 3.0, "sdpa-efficient": 4.0}
    timer.ms[fastest] = 0.1
    q, k, v = _qkv()
    lengths = torch.tensor([20, 13], dtype=torch.int32)
    ran = []
    real_triton = attention_mod.attention_triton
    monkeypatch.setattr(attention_mod, "attention_triton", lambda *a: ran.append("triton") or real_triton(*a))
    with pytest.warns(RuntimeWarning):
        out = attention(q, k, v, lengths, backend="auto")
    assert set(timer.timed) <= {"triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"}
    assert {"triton", "sdpa-flash"} <= set(timer.timed)
    assert auto.cached(attention_mod.auto_key(q, lengths)) == fastest
    ran.clear()
    out = attention(q, k, v, lengths, backend="auto")
    assert ran == (["triton"] if fastest == "triton" else [])
    torch.testing.assert_close(out, attention(q, k, v, lengths, backend="torch"), atol=1e-5, rtol=1e-5)


def test_attention_auto_key_has_op_dtype_head_dim_bucket_lengths_and_gpu():
    q, _, _ = _qkv(L=289, D=64)
    assert attention_mod.auto_key(q, None) == ("attention", "float32", 64, 10, False, "cpu")
    assert attention_mod.auto_key(q, torch.ones(2, dtype=torch.int32))[4] is True


def test_vq_auto_runs_the_measured_fastest(timer, monkeypatch):
    monkeypatch.setattr(auto, "active", lambda device: True)
    timer.ms = {"triton": 2.0, "torch": 1.0}
    z, book = torch.randn(37, 8), torch.randn(16, 8)
    got = vq_nearest(z, book, normalize=True, backend="auto")
    want = vq_nearest(z, book, normalize=True, backend="torch")
    assert torch.equal(got[0], want[0])
    assert auto.cached(vq_mod.vq_auto_key(z, book, True)) == "torch"


def test_dispatch_after_calibration_makes_no_host_sync(timer, monkeypatch):
    monkeypatch.setattr(auto, "active", lambda device: True)
    timer.ms = {"triton": 1.0, "sdpa-flash": 0.5, "sdpa-cudnn": 2.0, "sdpa-efficient": 2.0}
    q, k, v = _qkv()
    lengths = torch.tensor([20, 13], dtype=torch.int32)
    attention(q, k, v, lengths, backend="auto", validate=False)  # calibrates (fake timings)
    with count_syncs() as counts:
        attention(q, k, v, lengths, backend="auto", validate=False)
    assert counts.total == 0


def test_models_and_loaders_default_to_auto():
    assert BACKENDS[0] == "auto"
    model = ALIT(tiny_config())
    assert model.backend == "auto"
    assert all(m.backend == "auto" for m in model.modules() if hasattr(m, "backend"))
    for fn in (pretrained.load, checkpoint.load_file, checkpoint.load_official, pretrained.load_pretrained, pretrained.load_directory):
        assert inspect.signature(fn).parameters["backend"].default == "auto", fn.__name__
    for name in ("torch", "official", "triton"):
        model.set_backend(name)
        assert model.backend == name


def test_compiled_call_uses_the_eager_choice_and_traces_fullgraph(timer, monkeypatch):
    # the CPU playing a GPU; fullgraph=True fails on any graph break (file I/O, GPU-name lookup)
    monkeypatch.setattr(auto, "active", lambda device: True)
    timer.ms = {"triton": 2.0, "sdpa-flash": 1.0, "sdpa-cudnn": 3.0, "sdpa-efficient": 3.0}
    q, k, v = _qkv()
    eager = attention(q, k, v, backend="auto")  # calibrates: sdpa-flash
    timer.timed.clear()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend="auto", validate=False),
                             backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager)
    assert timer.timed == []


def test_compiled_call_without_an_eager_choice_uses_the_static_default(timer, monkeypatch):
    monkeypatch.setattr(auto, "active", lambda device: True)
    ran = []
    monkeypatch.setattr(attention_mod, "attention_triton", lambda *a: ran.append("triton") or a[0])
    q, k, v = _qkv()
    lengths = torch.tensor([20, 13], dtype=torch.int32)
    compiled = torch.compile(lambda q, k, v, n: attention(q, k, v, n, backend="auto", validate=False),
                             backend="eager", fullgraph=True)
    compiled(q, k, v, lengths)
    assert ran == ["triton"] and timer.timed == []  # ragged: Triton, untimed
