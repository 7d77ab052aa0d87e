"""The shared data/hook plumbing: accepted inputs, errors that name the argument, hook removal."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from hawq.base.errors import DataError
from hawq.modules.passes import StopForward, as_inputs, as_pair, hooked, run_batches


def test_as_pair_accepts_datasets_and_pairs_and_names_the_argument():
    x, y = torch.randn(4, 3), torch.arange(4)
    for data in (TensorDataset(x, y), (x, y), [x, y]):
        a, b = as_pair(data, "calib")
        assert a is x and b is y
    with pytest.raises(DataError, match="calib must be"):
        as_pair(x, "calib")
    with pytest.raises(DataError, match="calib has 4 inputs and 3 labels"):
        as_pair((x, y[:3]), "calib")
    with pytest.raises(DataError, match="train data has 0 inputs"):
        as_pair((x[:0], y[:0]), "train data")


def test_as_inputs_accepts_a_bare_tensor_and_rejects_empty_data():
    x = torch.randn(4, 3)
    assert as_inputs(x, "d") is x
    assert as_inputs((x, torch.arange(4)), "d") is x
    with pytest.raises(DataError, match="d holds no inputs"):
        as_inputs(x[:0], "d")
    with pytest.raises(DataError, match="d must be"):
        as_inputs("images.npz", "d")


def test_hooks_are_removed_and_stop_cuts_the_pass_short():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).train()
    seen = []

    def first(_m, _i, out):
        seen.append(out.shape[0])
        raise StopForward

    def second(_m, _i, _o):
        seen.append("second ran")

    with hooked([(net[0], first), (net[2], second)]):
        run_batches(net, torch.randn(5, 3), batch_size=2)
    assert seen == [2, 2, 1]  # three batches, each stopped before the last layer
    assert net.training  # eval mode during the pass, restored afterwards
    net(torch.randn(1, 3))  # no hook left behind
    assert seen == [2, 2, 1]
    with pytest.raises(RuntimeError):
        with hooked([(net[0], first)], pre=False):
            raise RuntimeError("body fails")
    net(torch.randn(1, 3))
    assert seen == [2, 2, 1]
