"""The wiring plan vs the recorded connectivity of the released models, and vs a literal
replay of the released ``layer_forward`` list bookkeeping (two views must agree)."""
import json

import pytest
from hypothesis import given, strategies as st

from sparx_ref.models import configs
from sparx_ref.models.wiring import (STAGE_INPUT, connectivity, dense_indices, ganglion_plan,
                                     released_current_d_dim)


def replay_layer_forward(depths, dims, dense_config):
    """Replay the released SparXMamba.forward / layer_forward with names instead of tensors.

    Written from docs/spec/sparx_mamba.md §4, statement by statement (including the shared
    list object: the tuple handed to a ganglion block holds ``inner``, which is then extended
    by ``cross``). Returns {(stage, idx): list of source names} for ganglion blocks and the
    ``dense_idx`` lists.
    """
    dense_idx = []
    for i in range(len(depths)):
        step, start = dense_config["dense_step"][i], dense_config["dense_start"][i]
        dense_idx.append([j for j in range(depths[i] - 1, start - 1, -step)][::-1])
    received = {}
    s = None
    for stage in range(len(depths)):
        max_dense_depth = dense_config["max_dense_depth"][stage]
        cross_stage = dense_config["cross_stage"][stage]
        inner_list, cross_list = [], []
        if s is not None:
            if cross_stage:
                cross_list.append(s)
            else:
                inner_list.append(s)
        for idx in range(depths[stage]):
            out = f"s{stage}.l{idx}"
            if idx in dense_idx[stage]:
                block_input = ("x", inner_list)
                if len(cross_list) > 0:
                    inner_list.extend(cross_list)
                received[(stage, idx)] = list(block_input[1])  # what torch.cat would see
                cross_list.append(out)
                inner_list = []
            else:
                inner_list.append(out)
            if max_dense_depth is not None and len(cross_list) > max_dense_depth:
                cross_list = cross_list[-max_dense_depth:]
        s = STAGE_INPUT  # the next stage's input is this stage's downsampled output
    return received, dense_idx


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_plan_reproduces_recorded_connectivity(variant, data_dir):
    rec = json.loads((data_dir / f"connectivity_sparx_mamba_{variant}.json").read_text())
    cfg = configs.SPARX_MAMBA_VARIANTS[f"sparx_mamba_{variant}"]
    plan = ganglion_plan(cfg["depths"], cfg["dims"], cfg["dense_config"])
    assert len(plan) == len(rec["stages"])
    for stage_plan, stage_rec in zip(plan, rec["stages"]):
        assert len(stage_plan) == stage_rec["depth"]
        assert [b.idx for b in stage_plan if b.ganglion] == stage_rec["dense_idx"]
        for block, layer in zip(stage_plan, stage_rec["layers"]):
            assert block.idx == layer["idx"] and block.ganglion == layer["ganglion"]
            assert block.dim == stage_rec["dim"]
            if layer["ganglion"]:
                assert list(block.sources) == layer["shortcut_inputs"]
                assert list(block.source_channels) == layer["shortcut_input_channels"]
                assert block.shortcut_channels == layer["current_d_dim"]
                assert block.shortcut_channels == layer["shortcut_channels_observed"]
            else:
                assert block.sources == () and block.shortcut_channels == 0


def test_golden_mini_a_connectivity(data_dir):
    meta = json.loads((data_dir / "golden_mini_a.json").read_text())
    c = meta["constructor"]
    plan = ganglion_plan(c["depths"], c["dims"], c["dense_config"])
    got = [{k: e[k] for k in ("stage", "idx", "shortcut_inputs", "shortcut_input_channels")}
           for e in connectivity(plan)]
    assert got == meta["connectivity"]
    assert [[b.idx for b in s if b.ganglion] for s in plan] == c["dense_idx"]


def test_spec_examples():
    # docs/spec/sparx_mamba.md §1 dense_idx lists and §4's S stage 2 layer 13 example
    expect = {"t": [[], [1], [0, 2, 4, 6], [0, 1]], "s": [[], [1], [1, 4, 7, 10, 13, 16], [0, 1]],
              "b": [[], [1], [2, 5, 8, 11, 14, 17, 20], [2]]}
    for v, lists in expect.items():
        cfg = configs.SPARX_MAMBA_VARIANTS[f"sparx_mamba_{v}"]
        plan = ganglion_plan(cfg["depths"], cfg["dims"], cfg["dense_config"])
        assert [[b.idx for b in s if b.ganglion] for s in plan] == lists
    cfg = configs.SPARX_MAMBA_VARIANTS["sparx_mamba_s"]
    plan = ganglion_plan(cfg["depths"], cfg["dims"], cfg["dense_config"])
    assert list(plan[2][13].sources) == ["s2.l11", "s2.l12", "s2.l4", "s2.l7", "s2.l10"]


@st.composite
def dense_configs(draw):
    num_stages = draw(st.integers(2, 4))
    depths = [draw(st.integers(1, 9)) for _ in range(num_stages)]
    dims = [4 * draw(st.integers(1, 8)) for _ in range(num_stages)]
    steps = [draw(st.integers(1, 4)) for _ in range(num_stages)]
    starts = [100] + [draw(st.integers(0, 10)) for _ in range(num_stages - 1)]
    caps = [draw(st.integers(1, 5)) for _ in range(num_stages)]
    cross = [draw(st.booleans()) for _ in range(num_stages)]
    return depths, dims, dict(dense_step=steps, dense_start=starts, max_dense_depth=caps,
                              cross_stage=cross)


@given(dense_configs())
def test_plan_matches_literal_replay(cfg):
    depths, dims, dense_config = cfg
    plan = ganglion_plan(depths, dims, dense_config)
    received, dense_idx = replay_layer_forward(depths, dims, dense_config)
    assert [[b.idx for b in s if b.ganglion] for s in plan] == dense_idx
    got = {(b.stage, b.idx): list(b.sources) for s in plan for b in s if b.ganglion}
    assert got == received
    for s in plan:
        for b in s:
            if b.ganglion:  # the released formula agrees with the concatenated width
                assert b.shortcut_channels == dims[b.stage] * len(received[(b.stage, b.idx)])
                assert b.shortcut_channels == released_current_d_dim(
                    b.dim, b.idx, dense_idx[b.stage], dense_config["dense_step"][b.stage],
                    dense_config["max_dense_depth"][b.stage], dense_config["cross_stage"][b.stage])


def test_ganglion_in_stage_0_rejected():
    dc = dict(dense_step=[1, 1, 2, 1], dense_start=[0, 1, 0, 0], max_dense_depth=[100, 100, 3, 100],
              cross_stage=[False] * 4)
    with pytest.raises(ValueError, match="stage 0"):
        ganglion_plan([2, 2, 7, 2], [8, 12, 20, 20], dc)
    dc["dense_start"][0] = 1  # only the last block of stage 0
    with pytest.raises(ValueError, match="stage 0"):
        ganglion_plan([2, 2, 7, 2], [8, 12, 20, 20], dc)
    dc["dense_start"][0] = 2  # no ganglion: fine
    assert not any(b.ganglion for b in ganglion_plan([2, 2, 7, 2], [8, 12, 20, 20], dc)[0])


def test_bad_configs_rejected():
    dc = dict(configs.SPARX_MAMBA_VARIANTS["sparx_mamba_t"]["dense_config"])
    with pytest.raises(ValueError, match="dense_step"):
        ganglion_plan([2, 2, 7], [8, 12, 20], dc)
    with pytest.raises(ValueError, match="dense_step"):
        dense_indices(4, 0, 0)
    with pytest.raises(ValueError, match="dense_start"):
        dense_indices(4, 1, -1)
    bad = dict(dc, max_dense_depth=[100, 100, 0, 100])
    with pytest.raises(ValueError, match="max_dense_depth"):
        ganglion_plan([2, 2, 7, 2], [8, 12, 20, 20], bad)
