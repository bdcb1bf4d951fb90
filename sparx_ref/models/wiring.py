"""The wiring rule of SparX: which earlier outputs feed each ganglion layer.

One pure function, :func:`ganglion_plan`, answers for every stage and block of a SparX
backbone whether the block is a *ganglion layer* (a block with sparse cross-layer
connections) and, if so, which tensors are concatenated (along channels, in order) into its
shortcut and how wide that concatenation is (the width of the block's ``d_norm``). The
NumPy model, the PyTorch twin, the SparX-Swin models and the figures all call it; nothing
else re-derives the rule.

The rule mirrors the released code (LMMMEng/SparX ``SparXMamba.layer_forward``; see
docs/spec/sparx_mamba.md §1 and §4):

* ``dense_idx`` of a stage counts down from ``depth - 1`` in steps of ``dense_step`` and
  keeps the indices ``>= dense_start``: ``sorted(range(depth-1, dense_start-1, -dense_step))``.
* ``layer_forward`` keeps two lists, ``inner`` (the stage input, then normal-layer outputs
  since the last ganglion layer) and ``cross`` (the last ``<= max_dense_depth`` ganglion
  outputs; the stage input starts here instead when ``cross_stage``). A ganglion layer gets
  ``inner + cross``; afterwards ``inner`` restarts empty.

So a ganglion layer's shortcut is, in concatenation order:
(the stage input, if no ganglion layer has run in this stage yet and not ``cross_stage``)
+ (normal-layer outputs since the previous ganglion layer, oldest first)
+ (the last ``<= max_dense_depth`` entries of [stage input if ``cross_stage``] + earlier
ganglion outputs, oldest first).

Source names: ``"stage_input"`` (the previous stage's downsampled output, which is also this
stage's ``x``) and ``"s{stage}.l{idx}"`` (the output of ``layers.{stage}.blocks.{idx}``),
the names used in ``tests/data/connectivity_sparx_mamba_*.json``.

The released model fixes the ``d_norm`` width (``current_d_dim``) by a separate formula
when it is built; :func:`released_current_d_dim` reproduces it and the plan checks it
against the concatenated width, so a configuration the released model could not run is
rejected with a ValueError instead of failing inside a forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

STAGE_INPUT = "stage_input"


def source_name(stage: int, idx: int) -> str:
    """Name of the output of block ``layers.{stage}.blocks.{idx}``: ``"s{stage}.l{idx}"``."""
    return f"s{stage}.l{idx}"


@dataclass(frozen=True)
class BlockPlan:
    """What one block of the backbone is and what it receives.

    stage, idx:         position, as in ``layers.{stage}.blocks.{idx}``.
    dim:                the stage width d (every source has d channels).
    ganglion:           True for a ganglion layer (``is_cross_layer`` in the released code).
    sources:            ganglion layers: names of the concatenated shortcut inputs, in
                        ``torch.cat`` order; () for normal blocks.
    source_channels:    channels of each source (all ``dim``).
    shortcut_channels:  width of the concatenated shortcut = width of ``op.d_norm``
                        (0 for normal blocks).
    """

    stage: int
    idx: int
    dim: int
    ganglion: bool
    sources: tuple = ()
    source_channels: tuple = ()
    shortcut_channels: int = 0

    @property
    def name(self) -> str:
        return source_name(self.stage, self.idx)


def dense_indices(depth: int, dense_step: int, dense_start: int) -> list:
    """Ganglion block indices of one stage, ascending (released ``dense_idx``).

    Counted from the END of the stage: ``depth-1, depth-1-step, ...`` while ``>= dense_start``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if dense_step < 1:
        raise ValueError(f"dense_step must be >= 1, got {dense_step}")
    if dense_start < 0:
        raise ValueError(f"dense_start must be >= 0, got {dense_start}")
    return list(range(depth - 1, dense_start - 1, -dense_step))[::-1]


def released_current_d_dim(dim: int, idx: int, stage_dense_idx: Sequence[int], dense_step: int,
                           max_dense_depth: int, cross_stage: bool) -> int:
    """The ``d_norm`` width the released ``SparXSS2D.__init__`` computes for ganglion ``idx``.

    First ganglion of the stage: ``d + d * idx``. Otherwise
    ``d * min(max_dense_depth, count) + d * (dense_step - 1)``, where ``count`` is the number
    of ganglion indices before ``idx`` (+1 with ``cross_stage``).
    """
    if idx == stage_dense_idx[0]:
        return dim + dim * idx
    count = (1 if cross_stage else 0) + list(stage_dense_idx).index(idx)
    return dim * min(max_dense_depth, count) + dim * (dense_step - 1)


def _per_stage(name: str, value, num_stages: int) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"dense_config[{name!r}] must be a list with one entry per stage, got {value!r}")
    if len(value) != num_stages:
        raise ValueError(f"dense_config[{name!r}] must have {num_stages} entries (one per stage), "
                         f"got {len(value)}: {list(value)}")
    return list(value)


def ganglion_plan(depths: Sequence[int], dims: Sequence[int],
                  dense_config: Mapping) -> list:
    """Plan every block of a SparX backbone: ``plan[stage][idx] -> BlockPlan``.

    depths: blocks per stage, e.g. [2, 2, 7, 2]; dims: widths per stage, e.g. [96, 192, 320, 512].
    dense_config: {"dense_step": [...], "dense_start": [...], "max_dense_depth": [...],
    "cross_stage": [...]} with one entry per stage (``cross_stage`` may be omitted: all False).

    Raises ValueError for a ganglion layer in stage 0 (it has no stage input, and the released
    model cannot run it), for ``max_dense_depth < 1``, and if the concatenated width ever
    differed from the released ``current_d_dim`` formula.
    """
    num_stages = len(depths)
    if len(dims) != num_stages:
        raise ValueError(f"dims must have one entry per stage ({num_stages}), got {list(dims)}")
    steps = _per_stage("dense_step", dense_config["dense_step"], num_stages)
    starts = _per_stage("dense_start", dense_config["dense_start"], num_stages)
    caps = _per_stage("max_dense_depth", dense_config["max_dense_depth"], num_stages)
    cross = _per_stage("cross_stage", dense_config.get("cross_stage", [False] * num_stages), num_stages)

    plan = []
    for stage in range(num_stages):
        depth, dim = int(depths[stage]), int(dims[stage])
        gang_idx = dense_indices(depth, int(steps[stage]), int(starts[stage]))
        if stage == 0 and gang_idx:
            raise ValueError(
                f"stage 0 cannot hold ganglion layers (it has no stage input; the released model "
                f"cannot run it), but dense_start[0]={starts[0]}, dense_step[0]={steps[0]} with "
                f"depth {depth} give ganglion indices {gang_idx}; use dense_start[0] >= depth")
        cap = int(caps[stage])
        if gang_idx and cap < 1:
            raise ValueError(f"max_dense_depth[{stage}] must be >= 1, got {cap}")

        # The rule in closed form (a literal replay of the list bookkeeping lives in the tests).
        stage_plan = []
        pending_normals: list = []      # normal outputs since the last ganglion layer
        earlier_ganglions: list = []    # ganglion outputs so far in this stage
        stage_input_in_inner = stage > 0 and not cross[stage]
        cross_prefix = [STAGE_INPUT] if (stage > 0 and cross[stage]) else []
        for idx in range(depth):
            name = source_name(stage, idx)
            if idx not in gang_idx:
                stage_plan.append(BlockPlan(stage, idx, dim, False))
                pending_normals.append(name)
                continue
            first = not earlier_ganglions
            inner = ([STAGE_INPUT] if (first and stage_input_in_inner) else []) + pending_normals
            cross_list = cross_prefix + earlier_ganglions
            if not first:  # the cap is applied after each block, so only once a block has run
                cross_list = cross_list[-cap:]
            sources = tuple(inner + cross_list)
            width = dim * len(sources)
            released = released_current_d_dim(dim, idx, gang_idx, int(steps[stage]), cap,
                                              bool(cross[stage]))
            if released != width:
                raise ValueError(
                    f"layers.{stage}.blocks.{idx}: the released model would build d_norm with "
                    f"{released} channels but its shortcut {list(sources)} has {width}; the "
                    f"released code cannot run this dense_config")
            stage_plan.append(BlockPlan(stage, idx, dim, True, sources, (dim,) * len(sources), width))
            earlier_ganglions.append(name)
            pending_normals = []
        plan.append(stage_plan)
    return plan


def connectivity(plan: list) -> list:
    """Flatten a plan to the ganglion entries as in the connectivity JSON files:
    ``[{"stage", "idx", "shortcut_inputs", "shortcut_input_channels", "current_d_dim"}]``."""
    return [dict(stage=b.stage, idx=b.idx, shortcut_inputs=list(b.sources),
                 shortcut_input_channels=list(b.source_channels), current_d_dim=b.shortcut_channels)
            for stage in plan for b in stage if b.ganglion]
