"""Checkpoint I/O on files the tests write themselves: .pth (weights_only), .npz, wrappers,
NumPy <-> torch conversion, and a released-layout round trip NumPy model <-> twin."""
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

import sparx_ref
from sparx_ref import checkpoint as ckpt
from sparx_ref import torch_models
from sparx_ref.testing import assert_close

SMALL = dict(depths=[1, 1, 2, 1], dims=[8, 8, 12, 16], num_classes=5)


def random_state(rng):
    return OrderedDict([("a.weight", rng.standard_normal((3, 2)).astype(np.float32)),
                        ("a.bias", rng.standard_normal(3)),
                        ("bn.num_batches_tracked", np.array(7, dtype=np.int64))])


def assert_same_state(got, ref):
    assert list(got) == list(ref)
    for k in ref:
        assert isinstance(got[k], np.ndarray), k
        assert got[k].dtype == np.asarray(ref[k]).dtype and got[k].shape == np.shape(ref[k]), k
        np.testing.assert_array_equal(got[k], ref[k])


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_round_trip(tmp_path, rng, suffix):
    state = random_state(rng)
    path = ckpt.save_checkpoint(state, tmp_path / f"w{suffix}")
    assert_same_state(sparx_ref.load_checkpoint(path), state)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_unwraps_training_checkpoints(tmp_path, rng, wrapper):
    state = random_state(rng)
    tensors = ckpt.to_torch_state_dict(state)
    torch.save({wrapper: tensors, "epoch": 299, "optimizer": {"lr": 1e-3}}, tmp_path / "w.pth")
    assert_same_state(ckpt.load_checkpoint(tmp_path / "w.pth"), state)
    # DataParallel's "module." prefix is stripped
    torch.save({wrapper: {"module." + k: v for k, v in tensors.items()}}, tmp_path / "dp.pth")
    assert_same_state(ckpt.load_checkpoint(tmp_path / "dp.pth"), state)


class NotATensor:
    def __reduce__(self):  # what an attacker's pickle would do; weights_only must refuse it
        return (print, ("this must never run",))


def test_pth_refuses_arbitrary_pickles(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"w": NotATensor()}}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        ckpt.load_checkpoint(tmp_path / "evil.pth")
    assert "must never run" not in capsys.readouterr().out


def test_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        ckpt.load_checkpoint(tmp_path / "w.txt")
    torch.save({"epoch": 3, "args": {"lr": 0.1, "name": "x"}}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="cannot find a state_dict"):
        ckpt.load_checkpoint(tmp_path / "nostate.pth")


def test_safetensors_if_installed(tmp_path, rng):
    pytest.importorskip("safetensors")
    state = random_state(rng)
    path = ckpt.save_checkpoint(state, tmp_path / "w.safetensors")
    assert_same_state(ckpt.load_checkpoint(path), state)


def test_conversion_both_ways(rng):
    state = random_state(rng)
    tensors = ckpt.to_torch_state_dict(state)
    assert tensors["a.weight"].dtype == torch.float32 and tensors["a.bias"].dtype == torch.float64
    assert tensors["bn.num_batches_tracked"].dtype == torch.int64
    as64 = ckpt.to_torch_state_dict(state, dtype=torch.float64)
    assert as64["a.weight"].dtype == torch.float64 and as64["bn.num_batches_tracked"].dtype == torch.int64
    assert_same_state(ckpt.to_numpy_state_dict(tensors), state)
    tensors["a.bias"].add_(1.0)  # the conversion copied: the NumPy state is untouched
    assert not np.array_equal(ckpt.to_numpy_state_dict(tensors)["a.bias"], state["a.bias"])


def test_timm_swin_hook_is_applied(tmp_path, rng, monkeypatch):
    swin = pytest.importorskip("sparx_ref.models.swin")
    if not hasattr(swin, "convert_timm_swin_state_dict"):
        pytest.skip("the Swin model has no timm conversion hook yet")
    state = random_state(rng)
    ckpt.save_checkpoint(state, tmp_path / "w.npz")
    monkeypatch.setattr(swin, "is_timm_swin_state_dict", lambda sd: "a.weight" in sd)
    monkeypatch.setattr(swin, "convert_timm_swin_state_dict",
                        lambda sd: OrderedDict(("converted." + k, v) for k, v in sd.items()))
    assert list(ckpt.load_checkpoint(tmp_path / "w.npz")) == ["converted." + k for k in state]
    assert list(ckpt.load_checkpoint(tmp_path / "w.npz", convert=False)) == list(state)


def test_numpy_model_and_twin_exchange_checkpoints(tmp_path, rng):
    """Twin -> .pth (released layout, float32) -> NumPy model, and NumPy -> .npz -> twin:
    the same logits either way (float32 model tolerance)."""
    twin = torch_models.build_model("sparx_mamba", **SMALL).eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": twin.state_dict()}, tmp_path / "twin.pth")
    model = sparx_ref.build_model("sparx_mamba", dtype=np.float32, seed=5, **SMALL)
    model.load_state_dict(sparx_ref.load_checkpoint(tmp_path / "twin.pth"), strict=True)
    model.eval()
    x = rng.standard_normal((2, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        ref = twin(torch.from_numpy(x))
    assert_close(model.forward(x), ref, np.float32, "model", "logits via .pth")

    ckpt.save_checkpoint(model.state_dict(), tmp_path / "model.npz")
    twin2 = torch_models.build_model("sparx_mamba", **SMALL).eval()
    twin2.load_state_dict(ckpt.to_torch_state_dict(ckpt.load_checkpoint(tmp_path / "model.npz")),
                          strict=True)
    with torch.no_grad():
        assert torch.equal(twin2(torch.from_numpy(x)), ref)
