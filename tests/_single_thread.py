"""An autouse fixture for test modules of tiny models: import ``one_thread`` to run them on one thread."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices gain nothing from threads, and on a shared CPU a second thread mostly waits
    # for a core (measured: a tiny rollout took 1.8 s on two busy threads, 0.04 s on one)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
