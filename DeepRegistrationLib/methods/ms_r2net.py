"""MS-R2Net: the hierarchical (multi-scale) R2Net for volumes too large for one network pass.

Joshi and Hong, "R2Net: Efficient and flexible diffeomorphic image registration using Lipschitz
continuous residual networks", Medical Image Analysis 2023, the multi-scale extension trained in
phases (see ``r2net.py`` for the R2Net itself):

- *Chunk branch* (local, full resolution). The pair is cut into ``k^3 = 8`` sub-volumes that
  overlap by 2 voxels (:func:`split_chunks`); an R2Net registers each chunk pair on its own.
  Its initial velocities ``v_0`` are put back together by :func:`merge_chunks`, averaging where
  chunks overlap.
- *Downsampled branch* (global, half resolution). A second R2Net registers the pair resampled to
  half size; its initial velocity is upsampled to the full grid (vectors rescaled).
- *Integration branch*. The merged chunk velocity and the upsampled global velocity are
  concatenated, a 3x3x3 convolution turns the 6 channels into one velocity, and ``N = 7``
  LC-ResNet blocks integrate it at the original resolution: ``phi(x) = x + v_N(x)``.
- *Multi-phase learning* (``config["phase"]``). Phase 1 trains the two branches, each with its
  own LC-ResNet and the R2Net loss (similarity + folding) at its own resolution: the chunk pairs
  at full resolution, the half-size pair at half resolution. Phase 2 freezes both branches and
  trains the fusing convolution and the integration blocks with the same loss on the full pair.

``forward(fixed, moving)`` returns the integration branch's displacement in phase 2; a phase-1
network (whose integration branch is untrained) returns the mean of the two branches'
displacements, so a phase-1 checkpoint is a usable registration too. Training (the shipped
checkpoint; the branches start from a trained ``r2net-nsvf``, see :func:`branches_from_r2net`)::

    python -m training ms-init --from r2net-nsvf.pt --output ms-r2net-init.pt
    python -m training train --method ms-r2net --iterations 150 --resume ms-r2net-init.pt \\
        --output ms-r2net-phase1.pt
    python -m training train --method ms-r2net --iterations 100 --config '{"phase": 2}' \\
        --resume ms-r2net-phase1.pt --output Resources/checkpoints/ms-r2net.pt

The fusing convolution starts as the mean of its two inputs (centre tap 1/2 on each), so phase 2
starts from an average of the branches' velocities. At inference the chunks go through the
network one at a time, which bounds memory on large grids: 1.96 GB peak for the whole process
with a real 1 mm working grid on the 1 mm MNI152 pair (benchmarks/ms_r2net_grid.py). The
shipped spec works on a 2 mm grid (``working_spacing_mm``); a 1 mm input is resampled to it.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import UserInputError
from ..spatial import resize_displacement, resize_image
from .base import (MethodSpec, forward_padded, register_method, run_network,
                   report_field, same_contrast, scored_pair)
from .r2net import (BLOCKS, FOLDING_WEIGHT, PAPER, SMOOTHNESS_WEIGHT, STEP_SCALE, TRAINING_SYNTH,
                    LCResNet, R2Net, conv3d_cpu, network_loss)

DEFAULT_CONFIG = {"encoder": [16, 32, 32, 32], "features": 16, "blocks": BLOCKS,
                  "stationary": False, "block_channels": 3, "step_scale": STEP_SCALE,
                  "lipschitz": "operator", "similarity": "lncc", "folding_weight": FOLDING_WEIGHT,
                  "smoothness_weight": SMOOTHNESS_WEIGHT,
                  "chunks": 2, "overlap": 2, "phase": 1}


# ------------------------------------------------------------------------------------- chunks
def chunk_layout(length: int, k: int = 2, overlap: int = 2) -> Tuple[int, List[int]]:
    """``(size, starts)`` of ``k`` equal chunks covering ``length`` voxels, neighbours sharing at
    least ``overlap`` voxels: ``size = ceil((length + (k - 1) overlap) / k)``."""
    k, overlap = int(k), int(overlap)
    if k < 1 or overlap < 0:
        raise UserInputError(f"chunks need k >= 1 and overlap >= 0 (got k={k}, overlap={overlap})")
    if k == 1:
        return length, [0]
    size = int(math.ceil((length + (k - 1) * overlap) / k))
    if size > length:
        raise UserInputError(f"a side of {length} voxels is too short for {k} chunks overlapping "
                             f"by {overlap}")
    return size, [int(round(i * (length - size) / (k - 1))) for i in range(k)]


def chunk_slices(shape: Sequence[int], k: int = 2, overlap: int = 2) -> List[Tuple[slice, ...]]:
    """The ``k^3`` (D, H, W) slices of :func:`split_chunks`, D varying slowest."""
    axes = []
    for length in shape:
        size, starts = chunk_layout(int(length), k, overlap)
        axes.append([slice(s, s + size) for s in starts])
    return list(itertools.product(*axes))


def split_chunks(volume: torch.Tensor, k: int = 2, overlap: int = 2) -> List[torch.Tensor]:
    """The ``k^3`` overlapping sub-volumes of ``volume`` ``(B, C, D, H, W)``, all the same size."""
    return [volume[(Ellipsis,) + region] for region in chunk_slices(volume.shape[2:], k, overlap)]


def merge_chunks(chunks: Sequence[torch.Tensor], shape: Sequence[int],
                 overlap: int = 2) -> torch.Tensor:
    """Put :func:`split_chunks` pieces back on the ``shape`` grid, averaging where they overlap.

    A field split and merged comes back exactly: the sums are taken in float64, where adding up
    to 8 float32 values is exact, and each voxel is divided by its count of 1, 2, 4 or 8 (a power
    of two). Differentiable; the chunks' values are in voxels of the full grid, so velocities and
    displacements need no rescaling.
    """
    k = int(round(len(chunks) ** (1.0 / 3.0)))
    if k ** 3 != len(chunks):
        raise ValueError(f"{len(chunks)} chunks is not a cube of a whole number")
    first = chunks[0]
    total = first.new_zeros((first.shape[0], first.shape[1], *shape), dtype=torch.float64)
    count = first.new_zeros((1, 1, *shape), dtype=torch.float64)
    for chunk, region in zip(chunks, chunk_slices(shape, k, overlap)):
        if tuple(chunk.shape[2:]) != tuple(total[(Ellipsis,) + region].shape[2:]):
            raise ValueError(f"chunk of size {tuple(chunk.shape[2:])} does not fit the layout of "
                             f"{tuple(shape)} with k={k}, overlap={overlap}")
        total[(Ellipsis,) + region] += chunk.double()
        count[(Ellipsis,) + region] += 1.0
    return (total / count).to(first.dtype)


def half_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """The grid of the downsampled branch: every other voxel (corners kept)."""
    return tuple(max((int(n) - 1) // 2 + 1, 2) for n in shape)


# ---------------------------------------------------------------------------------- the network
class MSR2Net(nn.Module):
    """Chunk branch + downsampled branch + integration branch (module docstring)."""

    def __init__(self, encoder: Sequence[int] = (16, 32, 32, 32), features: int = 16,
                 blocks: int = BLOCKS, stationary: bool = False, block_channels: int = 3,
                 step_scale: float = STEP_SCALE, lipschitz: str = "operator",
                 similarity: str = "lncc", folding_weight: float = FOLDING_WEIGHT,
                 chunks: int = 2, overlap: int = 2, phase: int = 1,
                 smoothness_weight: float = SMOOTHNESS_WEIGHT):
        super().__init__()
        if int(phase) not in (1, 2):
            raise UserInputError(f"MS-R2Net phase must be 1 or 2, not {phase}")
        branch = dict(encoder=encoder, features=features, blocks=blocks, stationary=stationary,
                      block_channels=block_channels, step_scale=step_scale, lipschitz=lipschitz,
                      similarity=similarity, folding_weight=folding_weight,
                      smoothness_weight=smoothness_weight)
        self.chunk_branch = R2Net(**branch)
        self.global_branch = R2Net(**branch)
        self.fuse = nn.Conv3d(6, 3, 3, 1, 1)
        with torch.no_grad():  # start as the mean of the two velocities
            self.fuse.weight.zero_()
            self.fuse.bias.zero_()
            for channel in range(3):
                self.fuse.weight[channel, channel, 1, 1, 1] = 0.5
                self.fuse.weight[channel, 3 + channel, 1, 1, 1] = 0.5
        self.integrate = LCResNet(blocks, stationary, block_channels, step_scale, lipschitz)
        self.chunks, self.overlap, self.phase = int(chunks), int(overlap), int(phase)
        self.similarity, self.folding_weight = similarity, float(folding_weight)
        self.smoothness_weight = float(smoothness_weight)
        self.branch_multiple = self.chunk_branch.size_multiple

    # -- branches ------------------------------------------------------------------------------
    def chunk_fields(self, function, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``function`` (a chunk-branch method) on every chunk pair, merged on the full grid.
        With gradients the chunks form one batch; without, they run one at a time (memory)."""
        fixed_chunks = split_chunks(fixed, self.chunks, self.overlap)
        moving_chunks = split_chunks(moving, self.chunks, self.overlap)
        if torch.is_grad_enabled():
            batch = forward_padded(function, torch.cat(fixed_chunks),
                                   torch.cat(moving_chunks), self.branch_multiple)
            pieces = list(batch.split(fixed.shape[0]))
        else:
            pieces = [forward_padded(function, f, m, self.branch_multiple)
                      for f, m in zip(fixed_chunks, moving_chunks)]
        return merge_chunks(pieces, fixed.shape[2:], self.overlap)

    def global_field(self, function, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``function`` (a global-branch method) on the half-size pair, upsampled to the grid."""
        shape = tuple(fixed.shape[2:])
        small = half_shape(shape)
        field = forward_padded(function, resize_image(fixed, small),
                               resize_image(moving, small), self.branch_multiple)
        return resize_displacement(field, shape)

    def fused_velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The integration branch's input: ``conv([v_chunks, v_global])``."""
        local = self.chunk_fields(self.chunk_branch.velocity, fixed, moving)
        coarse = self.global_field(self.global_branch.velocity, fixed, moving)
        return self.fuse_velocities(local, coarse)

    def fuse_velocities(self, local: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        both = torch.cat([local, coarse], dim=1)
        return conv3d_cpu(both, self.fuse.weight, 1) + self.fuse.bias.view(1, 3, 1, 1, 1)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if self.phase == 1:
            local = self.chunk_fields(self.chunk_branch, fixed, moving)
            coarse = self.global_field(self.global_branch, fixed, moving)
            return 0.5 * (local + coarse)
        return self.integrate(self.fused_velocity(fixed, moving))


def build_network(config: Dict) -> MSR2Net:
    config = dict(DEFAULT_CONFIG, **(config or {}))
    return MSR2Net(config["encoder"], config["features"], config["blocks"], config["stationary"],
                   config["block_channels"], config["step_scale"], config["lipschitz"],
                   config["similarity"], config["folding_weight"], config["chunks"],
                   config["overlap"], config["phase"], config["smoothness_weight"])


def branches_from_r2net(network: MSR2Net, r2net_state: Dict[str, torch.Tensor]) -> MSR2Net:
    """Initialise both branches with a trained R2Net's weights (a warm start for phase 1).

    The downsampled branch works at half the MS working grid -- 4 mm for the 2 mm default, the
    grid ``r2net-nsvf`` is trained on -- and the chunk branch registers sub-volumes, so a trained
    R2Net with the branches' config is a far better start than random weights on a CPU budget.
    Not in the paper, which trains the branches from scratch.
    """
    for branch in (network.chunk_branch, network.global_branch):
        try:
            branch.load_state_dict(r2net_state)
        except RuntimeError as error:
            raise UserInputError("the R2Net checkpoint does not fit the MS-R2Net branches (same "
                                 "encoder, features, blocks and 'stationary' needed): "
                                 f"{str(error).strip().splitlines()[0]}") from None
    return network


# -------------------------------------------------------------------------------------- training
def phase_one_loss(network: MSR2Net, fixed: torch.Tensor, moving: torch.Tensor,
                   scored: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   batch: Optional[Dict] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Each branch trained as an R2Net at its own resolution; the two losses added. ``scored``:
    the images the similarity scores (``base.scored_pair``), when not the ones seen. The field
    reported to the trainer's guidance terms is the global branch's, on the pair's grid (the
    chunks have no whole-volume field before phase two fuses them)."""
    small = half_shape(fixed.shape[2:])

    def branch_inputs(first, second):  # the chunks and the half-size pair of two images
        return (torch.cat(split_chunks(first, network.chunks, network.overlap)),
                torch.cat(split_chunks(second, network.chunks, network.overlap)),
                resize_image(first, small), resize_image(second, small))

    seen = branch_inputs(fixed, moving)
    rescored = branch_inputs(*scored) if scored is not None else seen
    local = forward_padded(network.chunk_branch, seen[0], seen[1], network.branch_multiple)
    chunk_loss, chunk_terms = network_loss(network, local, rescored[0], rescored[1])
    coarse = forward_padded(network.global_branch, seen[2], seen[3], network.branch_multiple)
    global_loss, global_terms = network_loss(network, coarse, rescored[2], rescored[3])
    report_field(batch, resize_displacement(coarse, tuple(fixed.shape[2:])))
    terms = {f"chunk_{k}": v for k, v in chunk_terms.items()}
    terms.update({f"global_{k}": v for k, v in global_terms.items()})
    return chunk_loss + global_loss, terms


def phase_two_loss(network: MSR2Net, fixed: torch.Tensor, moving: torch.Tensor,
                   batch: Optional[Dict] = None,
                   scored: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Branches frozen; the fusing convolution and the integration blocks trained on the pair."""
    network.chunk_branch.requires_grad_(False)
    network.global_branch.requires_grad_(False)
    with torch.no_grad():
        local = network.chunk_fields(network.chunk_branch.velocity, fixed, moving)
        coarse = network.global_field(network.global_branch.velocity, fixed, moving)
    displacement = report_field(batch, network.integrate(network.fuse_velocities(local, coarse)))
    return network_loss(network, displacement, *(scored or (fixed, moving)))


def training_loss(network: MSR2Net, fixed: torch.Tensor, moving: torch.Tensor,
                  batch: Optional[Dict] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The trainer's ``loss_fn`` hook: the loss of ``network.phase`` (``config["phase"]``)."""
    moving = same_contrast(fixed, moving, batch)
    scored = scored_pair(fixed, moving, batch) if (batch or {}).get("clean") else None
    if network.phase == 1:
        return phase_one_loss(network, fixed, moving, scored, batch)
    return phase_two_loss(network, fixed, moving, batch, scored)


SPEC = register_method(MethodSpec(
    name="ms-r2net",
    title="MS-R2Net (chunk + downsampled R2Net branches, integrated at full resolution)",
    paper=PAPER + " (multi-scale extension)",
    description="R2Net on 8 overlapping sub-volumes and on the half-size pair; their velocities "
                "are fused and integrated by Lipschitz residual blocks on a 2 mm grid.",
    run=run_network,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG),
    checkpoint="ms-r2net.pt",
    working_spacing_mm=2.0,
    size_multiple=2,   # the branches pad their own inputs to the U-Net's multiple
    training={"loss_fn": training_loss, "recipe_losses": True, "lr": 1e-3, "batch_size": 1,
              "synth": TRAINING_SYNTH,
              "curriculum": {"spacing_mm": 4.0, "fraction": 0.6, "batch_size": 4}},
    estimated_seconds={"2mm": 4.0, "1mm": 6.0},
))
