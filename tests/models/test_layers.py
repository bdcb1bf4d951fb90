"""sparx_ref.models.layers: leaf modules vs torch.nn modules (state_dict names and order,
forward, input and parameter gradients, BatchNorm train/eval and running statistics),
initialisation, strict loading, dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparx_ref.models import layers as M
from sparx_ref.models.nn import Module, Sequential
from sparx_ref.testing import assert_close

# (our module factory, torch module factory, input shape)
PAIRS = {
    "conv": (lambda r: M.Conv2d(4, 6, 3, 2, 1, rng=r), lambda: torch.nn.Conv2d(4, 6, 3, 2, 1), (2, 4, 7, 6)),
    "conv_dw_nobias": (lambda r: M.Conv2d(4, 4, 5, 1, 2, groups=4, bias=False, rng=r),
                       lambda: torch.nn.Conv2d(4, 4, 5, 1, 2, groups=4, bias=False), (2, 4, 6, 5)),
    "conv_1x1_g3": (lambda r: M.Conv2d(9, 6, 1, groups=3, rng=r), lambda: torch.nn.Conv2d(9, 6, 1, groups=3), (2, 9, 3, 4)),
    "linear": (lambda r: M.Linear(5, 3, rng=r), lambda: torch.nn.Linear(5, 3), (2, 4, 5)),
    "linear_nobias": (lambda r: M.Linear(5, 3, bias=False, rng=r), lambda: torch.nn.Linear(5, 3, bias=False), (4, 5)),
    "group_norm": (lambda r: M.GroupNorm(2, 6), lambda: torch.nn.GroupNorm(2, 6), (2, 6, 3, 4)),
    "group_norm_1": (lambda r: M.GroupNorm(1, 6), lambda: torch.nn.GroupNorm(1, 6), (2, 6, 3, 4)),
    "layer_norm": (lambda r: M.LayerNorm(6), lambda: torch.nn.LayerNorm(6), (2, 5, 6)),
    "batch_norm": (lambda r: M.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4), (3, 4, 3, 5)),
    "gelu": (lambda r: M.GELU(), lambda: torch.nn.GELU(), (2, 3, 4)),
    "silu": (lambda r: M.SiLU(), lambda: torch.nn.SiLU(), (2, 3, 4)),
    "sequential": (lambda r: Sequential(M.Conv2d(3, 4, 3, 1, 1, bias=False, rng=r), M.BatchNorm2d(4), M.GELU(),
                                        None, M.Conv2d(4, 2, 1, rng=r)),
                   lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(4),
                                               torch.nn.GELU(), torch.nn.Identity(), torch.nn.Conv2d(4, 2, 1)),
                   (2, 3, 5, 5)),
}


def _randomise(module: Module, rng):
    """Give every float parameter/buffer non-trivial values (running_var positive)."""
    state = {}
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = np.array(3, dtype=np.int64)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 1.5, v.shape)
        else:
            state[k] = rng.standard_normal(v.shape) * 0.5
    module.load_state_dict(state)
    return state


def _pair(name, rng):
    ours_f, torch_f, shape = PAIRS[name]
    ours, theirs = ours_f(rng), torch_f().double()
    state = _randomise(ours, rng)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return ours, theirs, shape


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_keys_order_and_shapes_match_torch(name, rng):
    ours, theirs = PAIRS[name][0](rng), PAIRS[name][1]()
    ref = theirs.state_dict()
    assert list(ours.state_dict()) == list(ref)
    for k, v in ours.state_dict().items():
        assert tuple(v.shape) == tuple(ref[k].shape), k
    n_torch = sum(p.numel() for p in theirs.parameters())
    assert ours.num_parameters() == n_torch


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", list(PAIRS))
def test_forward_backward_vs_torch(name, training, rng):
    ours, theirs, shape = _pair(name, rng)
    ours.train(training)
    theirs.train(training)
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    t_out = theirs(tx)
    out = ours.forward(x)
    dout = rng.standard_normal(out.shape)
    t_out.backward(torch.tensor(dout))
    dx = ours.backward(dout)
    assert_close(out, t_out, "float64", "autograd", "out")
    assert_close(dx, tx.grad, "float64", "autograd", "dx")
    t_grads = {n: p.grad for n, p in theirs.named_parameters()}
    assert list(ours.grads) == list(t_grads)
    for n, g in ours.grads.items():
        assert_close(g, t_grads[n], "float64", "autograd", f"d[{n}]")
    # buffers after the step (BN running stats in train mode) equal torch's
    t_state = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(t_state[k]) and v.dtype == np.int64
        else:
            assert_close(v, t_state[k], "float64", "autograd", k)


def test_batch_norm_train_then_eval(rng):
    bn, tbn = M.BatchNorm2d(3), torch.nn.BatchNorm2d(3).double()
    bn.train()
    for _ in range(3):
        x = rng.standard_normal((4, 3, 2, 3)) * 2 + 1
        bn.forward(x)
        tbn(torch.tensor(x))
    assert int(bn.num_batches_tracked) == 3
    assert_close(bn.running_mean, tbn.running_mean, "float64", "autograd", "running_mean")
    assert_close(bn.running_var, tbn.running_var, "float64", "autograd", "running_var")
    bn.eval()
    tbn.eval()
    x = rng.standard_normal((1, 3, 2, 2))
    before = bn.running_mean.copy()
    assert_close(bn.forward(x), tbn(torch.tensor(x)), "float64", "autograd", "eval out")
    assert np.array_equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 3


def test_grads_accumulate_and_zero(rng):
    conv = M.Conv2d(2, 3, 3, padding=1, rng=rng)
    x = rng.standard_normal((1, 2, 4, 4))
    dout = rng.standard_normal((1, 3, 4, 4))
    conv.forward(x)
    conv.backward(dout)
    g1 = conv.grads["weight"].copy()
    conv.forward(x)
    conv.backward(dout)
    assert np.allclose(conv.grads["weight"], 2 * g1)
    conv.zero_grad()
    assert not conv.grads["weight"].any()


def test_trunc_normal_init(rng):
    conv = M.Conv2d(64, 128, 3, rng=rng)
    lin = M.Linear(256, 128, rng=rng)
    for m in (conv, lin):
        assert abs(m.weight.std() - 0.02) < 0.002 and abs(m.weight.mean()) < 0.002
        assert np.all(m.bias == 0)
    gn, bn = M.GroupNorm(1, 5), M.BatchNorm2d(5)
    assert np.all(gn.weight == 1) and np.all(gn.bias == 0)
    assert np.all(bn.running_var == 1) and np.all(bn.running_mean == 0)


def test_torch_default_init_bounds(rng):
    """kaiming_uniform(a=sqrt 5): weight and bias ~ U(+-1/sqrt(fan_in)), like torch.nn.Conv2d."""
    conv = M.Conv2d(3, 96, 4, 4, rng=rng, init="torch_default")  # Swin's patch embedding
    bound = 1 / np.sqrt(3 * 4 * 4)
    t = torch.nn.Conv2d(3, 96, 4, 4)
    assert np.abs(conv.weight).max() <= bound and np.abs(conv.bias).max() <= bound
    assert abs(np.abs(conv.weight).max() - t.weight.abs().max().item()) < 0.02 * bound
    assert abs(conv.weight.std() - bound / np.sqrt(3)) < 0.05 * bound
    assert conv.bias.std() > 0.3 * bound  # biases are random, not zero
    lin = M.Linear(50, 10, rng=rng, init="torch_default")
    assert np.abs(lin.weight).max() <= 1 / np.sqrt(50) and lin.bias.any()
    with pytest.raises(ValueError, match="init"):
        M.Conv2d(3, 4, 1, init="kaiming")


def test_rng_makes_init_reproducible():
    a = M.Conv2d(3, 4, 3, rng=np.random.default_rng(5))
    b = M.Conv2d(3, 4, 3, rng=np.random.default_rng(5))
    assert np.array_equal(a.weight, b.weight)


def test_dtype_float32(rng):
    conv = M.Conv2d(2, 4, 3, padding=1, dtype=np.float32, rng=rng)
    bn = M.BatchNorm2d(4, dtype=np.float32)
    assert conv.weight.dtype == np.float32 and bn.running_var.dtype == np.float32
    assert bn.num_batches_tracked.dtype == np.int64
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    bn.train()
    out = bn.forward(conv.forward(x))
    assert out.dtype == np.float32 and bn.running_mean.dtype == np.float32
    with pytest.raises(TypeError, match="weight"):  # float64 input into a float32 module
        conv.forward(x.astype(np.float64))
    bn.astype(np.float64)
    assert bn.running_var.dtype == np.float64 and bn.num_batches_tracked.dtype == np.int64
    with pytest.raises(TypeError, match="dtype"):
        M.Linear(2, 3, dtype=np.int32)


def test_load_state_dict_strict_errors(rng):
    seq = Sequential(M.Conv2d(3, 4, 3, bias=False, rng=rng), M.BatchNorm2d(4))
    state = seq.state_dict()
    missing = {k: v for k, v in state.items() if k != "1.running_var"}
    with pytest.raises(ValueError, match=r"missing keys: \['1.running_var'\]"):
        seq.load_state_dict(missing)
    assert seq.load_state_dict(missing, strict=False)["missing"] == ["1.running_var"]
    with pytest.raises(ValueError, match="unexpected keys: \\['0.bias'\\]"):
        seq.load_state_dict({**state, "0.bias": np.zeros(4)})
    with pytest.raises(ValueError, match="misshapen keys"):
        seq.load_state_dict({**state, "1.weight": np.zeros(5)})
    new = {k: (v if k.endswith("tracked") else v + 1.0) for k, v in state.items()}
    seq.load_state_dict(new)
    assert np.array_equal(seq.state_dict()["0.weight"], new["0.weight"])


def test_constructor_validation():
    with pytest.raises(ValueError, match="groups"):
        M.Conv2d(3, 4, 1, groups=2)
    with pytest.raises(ValueError, match="num_groups"):
        M.GroupNorm(4, 6)
    with pytest.raises(TypeError, match="rng"):
        M.Linear(2, 3, rng=0)
