"""Variant tables: the one place that says what T, S and B are.

Every builder (NumPy model, PyTorch twin, figures, FLOP counters) reads these.
Sources: docs/spec/sparx_mamba.md §1, docs/spec/swin.md §1, docs/spec/sparx_swin.md §3.
"""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keyword names are the released SparXMamba class's.
SPARX_MAMBA_DEFAULTS = dict(
    in_chans=3, num_classes=1000,
    depths=[2, 2, 7, 2], dims=[96, 192, 320, 512],
    ssm_d_state=1, ssm_ratio=[2, 2, 2, 2], ssm_dt_rank="auto", ssm_conv=5,
    mlp_ratio=[4, 4, 4, 4], ls_init_value=[None, None, 1, 1], stem_type="v1",
    sr_ratio=[8, 4, 2, 1], drop_path_rate=0.0,
    dense_config=dict(dense_step=[1, 1, 2, 1], dense_start=[100, 1, 0, 0],
                      max_dense_depth=[100, 100, 3, 100],
                      cross_stage=[False, False, False, False]),
)

SPARX_MAMBA_VARIANTS = {
    "sparx_mamba_t": dict(
        depths=[2, 2, 7, 2], dims=[96, 192, 320, 512], stem_type="v1",
        dense_config=dict(dense_step=[1, 1, 2, 1], dense_start=[100, 1, 0, 0],
                          max_dense_depth=[100, 100, 3, 100], cross_stage=[False] * 4)),
    "sparx_mamba_s": dict(
        depths=[2, 2, 17, 2], dims=[96, 192, 328, 544], stem_type="v2",
        dense_config=dict(dense_step=[1, 1, 3, 1], dense_start=[100, 1, 0, 0],
                          max_dense_depth=[100, 100, 3, 100], cross_stage=[False] * 4)),
    "sparx_mamba_b": dict(
        depths=[2, 2, 21, 3], dims=[120, 240, 396, 636], stem_type="v2",
        dense_config=dict(dense_step=[1, 1, 3, 2], dense_start=[100, 1, 0, 2],
                          max_dense_depth=[100, 100, 3, 100], cross_stage=[False] * 4)),
}

# Trainable parameter counts of the released models (measured by the spec authors).
SPARX_MAMBA_PARAMS = {"sparx_mamba_t": 27_051_794, "sparx_mamba_s": 47_444_712,
                      "sparx_mamba_b": 83_536_168}

# Released checkpoints and their preprocessing (timm-style eval transform).
SPARX_MAMBA_RELEASE = {
    "sparx_mamba_t": dict(url="https://github.com/LMMMEng/SparX/releases/download/v1/sparx_mamba_tiny_in1k.pth",
                          input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.9,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, train_drop_path=0.2),
    "sparx_mamba_s": dict(url="https://github.com/LMMMEng/SparX/releases/download/v1/sparx_mamba_small_in1k.pth",
                          input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.95,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, train_drop_path=0.3),
    "sparx_mamba_b": dict(url="https://github.com/LMMMEng/SparX/releases/download/v1/sparx_mamba_base_in1k.pth",
                          input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.95,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, train_drop_path=0.5),
}

# Keyword names are the released SwinTransformer class's.
SWIN_DEFAULTS = dict(
    img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
    depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0,
    qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
    ape=False, patch_norm=True,
)

SWIN_VARIANTS = {
    "swin_t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "swin_s": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
    "swin_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
}
SWIN_PARAMS = {"swin_t": 28_288_354, "swin_s": 49_606_258, "swin_b": 87_768_224}

# SparX-Swin: the project's reconstruction (docs/spec/sparx_swin.md), NOT the authors' code.
SPARX_SWIN_DEFAULTS = dict(
    SWIN_DEFAULTS, sr_ratio=[8, 4, 2, 1],
    dense_config=dict(dense_step=[1, 1, 2, 1], dense_start=[100, 1, 0, 0],
                      max_dense_depth=[100, 100, 3, 100], cross_stage=[False] * 4),
)
SPARX_SWIN_VARIANTS = {
    "sparx_swin_t": dict(SWIN_VARIANTS["swin_t"], dense_config=dict(
        dense_step=[1, 1, 2, 1], dense_start=[100, 1, 0, 0],
        max_dense_depth=[100, 100, 3, 100], cross_stage=[False] * 4)),
    "sparx_swin_s": dict(SWIN_VARIANTS["swin_s"], dense_config=dict(
        dense_step=[1, 1, 3, 1], dense_start=[100, 1, 0, 0],
        max_dense_depth=[100, 100, 3, 100], cross_stage=[False] * 4)),
    "sparx_swin_b": dict(SWIN_VARIANTS["swin_b"], dense_config=dict(
        dense_step=[1, 1, 3, 1], dense_start=[100, 1, 0, 0],
        max_dense_depth=[100, 100, 3, 100], cross_stage=[False] * 4)),
}

# A dense config with no ganglion layer anywhere (SparX-Swin then equals Swin exactly).
NO_GANGLION = dict(dense_step=[1, 1, 1, 1], dense_start=[100, 100, 100, 100],
                   max_dense_depth=[100, 100, 100, 100], cross_stage=[False] * 4)
