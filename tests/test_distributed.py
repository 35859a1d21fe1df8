"""Every command joins torchrun's group through alit_fast.distributed: one backend rule, one timeout."""
import torch
import torch.distributed as dist

from alit_fast import distributed


def test_alone_nothing_is_joined_and_the_device_is_kept(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.rank_world() == (0, 1)
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")
    assert distributed.join_group(torch.device("cpu")) is False


def test_under_torchrun_the_group_gets_gloo_on_a_cpu_and_the_shared_timeout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    assert distributed.rank_world() == (1, 2)
    assert distributed.join_group(torch.device("cpu")) is True
    assert calls == [("gloo", distributed.TIMEOUT)]
