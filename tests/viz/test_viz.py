"""sparx_ref.viz: figures draw what the plan / ops say, and the flow measurements behave."""
import numpy as np
import pytest

from sparx_ref import viz
from sparx_ref.ref import scan, ss2d, window_attention
from sparx_ref.testing import rel_err
from sparx_ref.tolerances import tolerance


@pytest.mark.parametrize("variant", ["sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b", "sparx_swin_t"])
def test_connectivity_diagram_draws_one_arc_per_connection(variant, tmp_path):
    from sparx_ref.viz.wiring import arc_count
    plan = viz.plan_for(variant)
    connections = sum(len(b.sources) for stage in plan for b in stage)
    downsamples = len(plan) - 1
    fig = viz.connectivity_diagram(variant, save=tmp_path / "c.png")
    assert arc_count(fig) == connections + downsamples
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_feature_flow_graph_validates_contributions():
    plan = viz.plan_for("sparx_mamba_t")
    good = {(2, 2): {"s2.l1": 0.5, "s2.l0": 0.1}}
    viz.feature_flow_graph(plan, good)
    with pytest.raises(ValueError, match="not a ganglion layer"):
        viz.feature_flow_graph(plan, {(2, 1): {"s2.l0": 1.0}})
    with pytest.raises(ValueError, match="has sources"):
        viz.feature_flow_graph(plan, {(2, 2): {"s2.l5": 1.0}})


def test_plan_for_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown variant"):
        viz.plan_for("sparx_mamba_xl")
    with pytest.raises(TypeError):
        viz.plan_for(3)


def test_region_labels_rebuild_the_ops_mask(rng):
    for H, W, M, s in [(8, 8, 4, 2), (12, 8, 4, 1), (14, 21, 7, 3)]:
        labels = viz.region_labels(H, W, M, s)
        assert len(np.unique(labels)) == 9
        np.testing.assert_array_equal(viz.mask_from_labels(labels, M),
                                      window_attention.shifted_window_mask(H, W, M, s))
    fig = viz.shifted_window_regions(8, 8, 4, 2)
    assert len(fig.axes) >= 3


def test_scan_pixel_order_and_query_attention_reproduce_ss2d(rng):
    H, W = 3, 5
    L = H * W
    order = viz.scan_pixel_order(H, W)
    assert sorted(order[1].tolist()) == list(range(L))
    x = rng.standard_normal((1, 1, H, W))
    delta = rng.standard_normal((1, 4, L)) * 0.5
    A = -np.exp(rng.standard_normal((4, 1)))
    B = rng.standard_normal((1, 4, 1, L))
    C = rng.standard_normal((1, 4, 1, L))
    y, _ = ss2d.ss2d_scan_fwd(x, delta, A, B, C, delta_softplus=True)
    M = scan.scan_matrix(delta, A, B, C, delta_softplus=True)[0]       # (4, L, L)
    for q in [(0, 0), (1, 3), (2, 4)]:
        maps = viz.query_attention(M, H, W, q)
        assert rel_err(np.array([(maps.sum(0) * x[0, 0]).sum()]), np.array([y[0, 0][q]])) \
            <= tolerance("float64", "two_views")
    with pytest.raises(ValueError, match="query"):
        viz.query_attention(M, H, W, (3, 0))


def test_dmca_attention_maps_shape_checks(rng):
    attn = rng.dirichlet(np.ones(6), size=(2, 4, 6))
    fig = viz.dmca_attention_maps(attn)
    assert len(fig.axes) == 5                                           # 4 maps + colour bar
    with pytest.raises(ValueError, match="attn"):
        viz.dmca_attention_maps(rng.standard_normal((4, 6, 5)))


def test_cross_layer_cost_counts_d_proj_of_the_plan():
    cost = viz.cross_layer_cost("sparx_mamba_t")
    plan = viz.plan_for("sparx_mamba_t")
    assert cost["sparse_channels"] == [b.shortcut_channels for stage in plan for b in stage]
    # layers.2.blocks.6 at 14x14: (9 + 2*320) * 1280 * 196 MACs
    i = cost["names"].index("s2.l6")
    assert cost["sparse_flops"][i] == 2 * (9 + 2 * 320) * 1280 * 14 * 14
    assert cost["dense_total_flops"] > cost["sparse_total_flops"]


def test_flow_measurements_on_a_tiny_twin():
    torch = pytest.importorskip("torch")
    from sparx_ref.torch_models import build_model
    from sparx_ref.viz import flow
    torch.manual_seed(0)
    cfg = dict(depths=[1, 2, 3, 1], dims=[8, 16, 16, 16], num_classes=3, sr_ratio=[8, 2, 1, 1],
               dense_config=dict(dense_step=[1, 1, 2, 1], dense_start=[100, 1, 0, 0],
                                 max_dense_depth=[100, 100, 3, 100]))
    model = build_model("sparx_mamba", **cfg)
    with torch.no_grad():                      # released init is tiny; make sources matter
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    images = torch.randn(4, 3, 32, 32)
    measured = flow.ablation_contributions(model, images, batch_size=2)
    expected = {(b.stage, b.idx): set(b.sources) for stage in model.plan for b in stage if b.ganglion}
    for which in ("op", "block"):
        assert {k: set(v) for k, v in measured[which].items()} == expected
        assert all(v > 0 for per in measured[which].values() for v in per.values())
    # the hooks are removed: the model's output is unchanged afterwards
    with torch.no_grad():
        a = model(images)
        b = model(images)
    assert torch.equal(a, b)
    shares = flow.d_proj_weight_shares(model)
    for per in shares.values():
        assert abs(sum(per.values()) - 1) < 1e-6
    rows = flow.source_feature_maps(model, images[:1], stage=2, idx=2)
    assert list(rows)[:2] == ["source s2.l1", "source s2.l0"]
    fig = viz.feature_maps(rows, max_cols=4)
    assert len(fig.axes) == 4 * len(rows)
