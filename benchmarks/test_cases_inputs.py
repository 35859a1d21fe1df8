"""What the timed sections of the GPU run may not do: draw their inputs on the host (a host draw
and a copy of tens of millions of values per case cost more than the timings themselves), or
validate inside a timed call (a host sync per call). Checked on the source of benchmarks/cases.py
and benchmarks/gpu_suite.py, and by running the kernel cases under a sync counter."""
from __future__ import annotations

import ast

import pytest
import torch

from alit_fast.testing import count_syncs
from benchmarks import cases
from benchmarks._env import REPO
from benchmarks.cases import Sizes, attention_case, attention_shapes, default_device, vq_case

_RANDOM = {"randn", "rand", "randint", "randperm", "normal", "random_images"}
# the public ops: each validates its inputs unless told validate=False
_VALIDATING = {"vq_nearest", "vq_nearest_reference", "vq_nearest_naive", "vq_nearest_triton_op", "attention",
               "attention_math", "attention_reference"}


def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def host_draws(source: str) -> list[str]:
    """Random draws without ``device=`` (they land on the host), on a literal "cpu" device, or from a
    generator made without a device."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name, device = _name(node), _keyword(node, "device")
        if name in _RANDOM or name == "Generator":
            if device is None or (isinstance(device, ast.Constant) and device.value == "cpu"):
                out.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return out


def validating_calls(source: str) -> list[str]:
    """Calls of a validating op that do not pass ``validate=False``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _name(node) in _VALIDATING:
            value = _keyword(node, "validate")
            if not (isinstance(value, ast.Constant) and value.value is False):
                out.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return out


def test_rules_catch_what_they_forbid():
    bad = (
        "x = torch.randn(4, generator=g).to(device)\n"
        "g = torch.Generator(device='cpu').manual_seed(0)\n"
        "y = torch.rand(2, device='cpu')\n"
        "fn = lambda: vq_nearest(z, cb, True, backend='triton')\n"
        "fn2 = lambda: attention(q, k, v, validate=True)\n"
    )
    assert len(host_draws(bad)) == 3
    assert len(validating_calls(bad)) == 2
    good = "x = torch.randn(4, generator=g, device=device)\nfn = lambda: vq_nearest(z, cb, True, validate=False)\n"
    assert host_draws(good) == [] and validating_calls(good) == []


def test_cases_draw_inputs_on_the_device_and_never_validate():
    source = (REPO / "benchmarks" / "cases.py").read_text()
    assert host_draws(source) == []
    assert validating_calls(source) == []


def test_gpu_suite_draws_inputs_on_the_device():
    assert host_draws((REPO / "benchmarks" / "gpu_suite.py").read_text()) == []


def test_inputs_are_made_once_per_shape():
    sizes = Sizes.cpu()
    shape = attention_shapes(sizes)[0]
    device = torch.device("cpu")
    a = attention_case("sdpa-math", shape, sizes, device, backward=True)
    b = attention_case("eager-math", shape, sizes, device, backward=False)
    # the two cases' q/k/v are leaves of their own over one storage, drawn once
    assert a.grads[0].untyped_storage().data_ptr() == cases._INPUTS[next(iter(cases._INPUTS))][0].untyped_storage().data_ptr()
    assert b.grads == [] and len(cases._INPUTS) == 1
    n, k, d, normalize = sizes.vq[0]
    vq_case("chunked", n, k, d, normalize, device)
    assert len(cases._INPUTS) == 1 and next(iter(cases._INPUTS))[0] == "vq"


@pytest.mark.parametrize("provider", ["chunked", "cublas-tf32", "naive", "triton"])
def test_vq_cases_make_no_host_sync(provider):
    n, k, d, normalize = Sizes.cpu().vq[0]
    case = vq_case(provider, 512, k, d, normalize, default_device())  # triton: compiled on a GPU
    with case.context():
        case.fn()  # first call: lazy set-up (kernel definition) is not the timed work
        with count_syncs() as syncs:
            case.fn()
    assert syncs.total == 0, dict(syncs)


@pytest.mark.parametrize("provider", ["eager-math", "sdpa-math"])
def test_attention_cases_make_no_host_sync(provider):
    sizes = Sizes.cpu()
    shape = next(s for s in attention_shapes(sizes) if s.mixed)
    case = attention_case(provider, shape, sizes, default_device(), backward=True)
    with case.context():
        with count_syncs() as syncs:
            case.fn()
    assert syncs.total == 0, dict(syncs)
