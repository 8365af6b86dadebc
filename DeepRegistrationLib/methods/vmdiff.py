"""VoxelMorph-diff: a U-Net predicts a stationary velocity field, scaling and squaring turns it into
a diffeomorphic displacement.

Dalca, Balakrishnan, Guttag, Sabuncu, "Unsupervised learning of probabilistic diffeomorphic
registration for images and surfaces", Medical Image Analysis 2019 (MICCAI 2018), and Balakrishnan
et al., "VoxelMorph", IEEE TMI 2019:

- the moving and fixed images are concatenated and passed through a U-Net;
- a 3x3x3 convolution (initialised near zero) maps the U-Net features to a velocity ``v``;
- ``u = exp(v)`` by scaling and squaring (``spatial.integrate_velocity``) on a grid of half the
  resolution, upsampled (VoxelMorph's ``int_downsize=2``), a diffeomorphism for a smooth ``v``;
  the warped image is ``warp(moving, u)``;
- training minimises ``S(F, M o u) + lambda * Diffusion(u)`` without any ground truth (the
  shipped checkpoint adds the general recipe's supervised guidance: training/README.md).

Differences from the paper, for a 2-core CPU: the deterministic (mean-velocity) variant trained
with local NCC (9^3 -> 5^3 window, 20 mm at 4 mm voxels) and a diffusion regulariser on the
displacement instead of the probabilistic KL loss; a narrow U-Net (about 380k parameters, most of
them in the coarse levels); and the network runs on an isotropic working grid -- its
checkpoint's (2 mm for the shipped one), else 4 mm -- its field upsampled to the fixed grid
(``base.run_network``); add ``--refine N`` for instance optimisation at full resolution. A training step (batch 1, 64^3 canvas) takes about 0.5 s on 2 CPU cores.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from ..spatial import integrate_velocity, resize_displacement
from .base import MethodSpec, register_method, run_network
from .blocks import UNet, flow_head

DEFAULT_CONFIG = {"encoder": [16, 32, 32, 32], "features": 16, "integration_steps": 7,
                  "integration_downsize": 2}


class VoxelMorphDiff(nn.Module):
    """``forward(fixed, moving)`` -> displacement ``(B, 3, D, H, W)`` in input-grid voxels."""

    def __init__(self, encoder=(16, 32, 32, 32), features: int = 16, integration_steps: int = 7,
                 integration_downsize: int = 2):
        super().__init__()
        self.unet = UNet(2, tuple(encoder), features)
        self.flow = flow_head(features)
        self.integration_steps = int(integration_steps)
        self.integration_downsize = max(int(integration_downsize), 1)

    def velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The stationary velocity field (voxels) for the pair (moving first, as in VoxelMorph)."""
        return self.flow(self.unet(torch.cat([moving, fixed], dim=1)))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        velocity = self.velocity(fixed, moving)
        if self.integration_downsize == 1:
            return integrate_velocity(velocity, self.integration_steps)
        # as VoxelMorph's int_downsize: integrate on a coarser grid, upsample the displacement
        shape = tuple(velocity.shape[2:])
        coarse = tuple(max((n - 1) // self.integration_downsize + 1, 2) for n in shape)
        return resize_displacement(
            integrate_velocity(resize_displacement(velocity, coarse), self.integration_steps),
            shape)


def build_network(config: Dict) -> VoxelMorphDiff:
    config = dict(DEFAULT_CONFIG, **(config or {}))
    return VoxelMorphDiff(config["encoder"], config["features"], config["integration_steps"],
                          config["integration_downsize"])


SPEC = register_method(MethodSpec(
    name="vm-diff",
    title="VoxelMorph-diff (U-Net velocity + scaling and squaring)",
    paper="Dalca et al., Unsupervised learning of probabilistic diffeomorphic registration for "
          "images and surfaces, MedIA 2019 (MICCAI 2018)",
    description="A small U-Net predicts a stationary velocity on its checkpoint's grid (2 mm); "
                "its exponential is a diffeomorphic displacement. One forward pass; add --refine "
                "for detail.",
    run=run_network,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG),
    checkpoint="vm-diff.pt",
    working_spacing_mm=4.0,
    size_multiple=16,
    # trainer schema (training/train.py): similarity (name, weight[, options]) + regulariser weights
    # LNCC is a same-contrast similarity: no second-contrast pairs (R2Net and VTN train those in
    # the fixed contrast, so the three see the same kind of data); little noise, because the
    # noise of the zero background dominates the local variance there
    training={"similarity": ("lncc", 1.0, {"window": 5}), "diffusion": 1.0, "batch_size": 4,
              "synth": {"contrast_probability": 0.0, "noise_max": 0.01}},
    estimated_seconds={"2mm": 1.5, "1mm": 4.0},
))
