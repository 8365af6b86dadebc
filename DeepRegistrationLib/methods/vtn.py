"""VTN: Volume Tweening Network -- cascaded affine and dense registration subnetworks trained end to
end without supervision.

Zhao, Lau, Luo, Chang, Xu, "Unsupervised 3D End-to-End Medical Image Registration with Volume
Tweening Network", IEEE Journal of Biomedical and Health Informatics 24(5), 2020 (arXiv 1902.05020).

The method, as in the paper (equation numbers of the arXiv version in brackets):

- *Warping and composition.* ``warp(I, f)(x) = I(x + f(x))``; warping by ``f1`` then by ``f2`` is
  warping once by ``f1 * f2 = f2 + warp(f1, f2)`` [3, 4] (``spatial.compose``).
- *Cascade.* Subnetworks run one after another. Stage ``k`` registers the fixed image to the
  current warped moving image and predicts a flow ``f_k``; the flows are composed,
  ``phi_k = f_1 * ... * f_k``, and the moving image is warped again *from the original* by
  ``phi_k`` (never warped twice, so interpolation blur does not accumulate). The result is
  ``phi_n``, a displacement in voxels with ``warped(x) = moving(x + phi_n(x))``.
- *Affine subnetwork* ("A"). Strided 3-D convolutions halve the concatenated pair's resolution
  while the channels double, down to a small volume; a fully connected layer outputs 12 numbers,
  ``A`` (3x3) and ``b``, both initialised to zero, and the flow is ``f(x) = A x + b`` on centred
  voxel coordinates -- the transform ``x -> (I + A) x + b``. It is regularised by
  ``L_det = (det(I + A) - 1)^2`` and ``L_ortho = -6 + sum_i (s_i^2 + s_i^-2)`` (``s_i`` the singular
  values of ``I + A``), weights 0.1 each: a prior towards rotations without scaling extremes.
  After an affine stage the next flow is composed exactly, ``phi = f_A + (I + A) f`` (the affine
  field is known everywhere, so nothing is interpolated or clamped at the border).
- *Dense subnetwork* ("D"). An encoder of stride-2 3x3x3 convolutions (channels double as the
  resolution halves; an extra stride-1 convolution from the third level on), and a decoder of 4x4x4
  transposed convolutions with U-Net skip connections; as in the paper's figure each decoder level
  also predicts a coarse 3-channel flow that is upsampled (transposed convolution) and
  concatenated to the next level's features. A last transposed convolution, initialised to zero,
  outputs the 3-channel flow at input size.
- *Losses* (Table I, unsupervised): every stage's warped image is compared with the fixed image by
  ``1 - CorrCoef`` [5-7]; each dense flow is smoothed by the total variation loss
  ``sum_d mean((f(x + e_d) - f(x))^2)``; the affine flow by L_det and L_ortho. Weights, for ADDD:

      ========  ==========  ===  =====  =====
      stage     1-CorrCoef  TV   det    ortho
      ========  ==========  ===  =====  =====
      affine    1           --   0.1    0.1
      dense 1   0           1    --     --
      dense 2   0.05        1    --     --
      dense 3   1           1    --     --
      ========  ==========  ===  =====  =====

  With fewer dense stages the similarity weights are taken from the *end* of (0, 0.05, 1): the
  last dense stage always has 1, the one before it 0.05, earlier ones 0 (D: 1; DD: 0.05, 1).
- *Invertibility* ("+inv"): the network also registers the pair the other way round and
  ``L_inv = ||f12 * f21||^2 + ||f21 * f12||^2``, the unnormalised squared norm -- a sum over the
  voxels of the central region (a quarter of each side left out) -- weight 1e-3, is added; both
  directions contribute their Table I losses (averaged). Being a sum in squared voxels, the term
  grows with the grid (``losses.invertibility_loss``): on the 4 mm training canvas (48x64x64) the
  central region has 24,576 voxels, on the 8 mm curriculum stage 3,072, on the paper's 128^3
  volumes 262,144. At that weight a training run of CPU length stays at the identity (both
  directions predict zero flow, which is perfectly inverse-consistent: measured on a tiny
  problem in Testing/test_vtn.py and in a 2 mm run of the full network), so "+inv" is off by
  default and ``"invertibility_weight"`` scales it when switched on.
  Synthetic pairs in two contrasts are trained in one (``same_contrast``): 1 - CorrCoef is a
  same-contrast similarity. Config ``"similarity": "lncc"`` swaps in local NCC (not the paper's).

Differences from the paper (see docs/methods/vtn.md): a 4 mm working grid (the field is upsampled
to the fixed grid; ``--refine`` polishes it), far narrower subnetworks and 4-5 resolution levels
instead of 6 (2 CPU cores, no GPU), an adaptive average pool before the affine fully connected
layer (so any grid size works), LeakyReLU 0.2 of the shared blocks instead of 0.1, and training on
synthetic deformations of a few real volumes instead of thousands of scans.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import UserInputError
from ..losses import (affine_determinant_loss, affine_orthogonality_loss,
                      correlation_coefficient_loss, invertibility_loss, local_ncc_loss,
                      total_variation_loss)
from ..spatial import affine_displacement, compose, warp
from .base import (MethodSpec, RegistrationInputs, checkpoint_folders, find_checkpoint,
                   load_network, register_method, report_field, run_network,
                   same_contrast, scored_pair)
from .blocks import ConvBlock, UpBlock

VARIANTS = ("ADDD", "ADD", "AD", "DDD", "DD", "D")
# channels after each stride-2 convolution. The paper doubles them per level (16, 32, ..., 512
# over six levels at 128^3); at 4 mm four (dense) or five (affine) levels reach a 3x4x3 or 2x2x2
# volume, and narrower coarse levels keep the ADDD checkpoint at about 2.2M parameters (9 MB)
# "+inv" is off by default: at the paper's weight the invertibility loss keeps a CPU-length
# training run at the identity (docs/methods/vtn.md, "The invertibility loss"); it is the paper's
# loss and weight when switched on ({"invertibility": true}), and "invertibility_weight" scales it
DEFAULT_CONFIG = {"variant": "ADDD", "dense_encoder": [16, 32, 32, 64],
                  "affine_encoder": [8, 16, 32, 64, 64], "affine_pool": 2, "invertibility": False,
                  "similarity": "cc", "invertibility_weight": 1e-3}

# Table I loss weights as specified for this project (see the module docstring); the authors'
# public RCN code agrees on det / ortho 0.1 and TV 1 -- docs/methods/vtn.md on what was checked
AFFINE_SIMILARITY_WEIGHT = 1.0
AFFINE_DETERMINANT_WEIGHT = 0.1
AFFINE_ORTHOGONALITY_WEIGHT = 0.1
DENSE_SIMILARITY_WEIGHTS = (0.0, 0.05, 1.0)   # of the last three dense stages, in order
DENSE_TV_WEIGHT = 1.0
# on the unnormalised sum of losses.invertibility_loss, as in the paper (a per-voxel mean with this
# weight, used before, made "+inv" about 2.5e4 times weaker on the 4 mm canvas: 1-2.5% of the loss);
# the default of config "invertibility_weight"
INVERTIBILITY_WEIGHT = DEFAULT_CONFIG["invertibility_weight"]
# the paper's similarity is "cc" (1 - CorrCoef over the volume); "lncc" (local, 5-voxel windows)
# is offered as a training option -- not the paper's -- for pairs where a global measure is weak
SIMILARITIES = {"cc": correlation_coefficient_loss,
                "lncc": lambda fixed, warped: local_ncc_loss(fixed, warped, 5)}


def check_variant(variant: str) -> str:
    """A variant names the stages in order: an optional affine "A", then one or more dense "D"."""
    variant = str(variant).upper()
    if not re.fullmatch(r"A?D+", variant):
        raise UserInputError(f"VTN variant '{variant}' is not an optional 'A' followed by one or "
                             f"more 'D' (e.g. {', '.join(VARIANTS)})")
    return variant


class AffineSubnetwork(nn.Module):
    """The affine registration subnetwork: ``(fixed, moving) -> [I + A | b]`` ``(B, 3, 4)``.

    ``A`` and ``b`` act on centred voxel coordinates in (k, j, i) order (the grid is isotropic, so
    voxels and millimetres differ by a scale only); the fully connected layer starts at zero, so
    the subnetwork starts at the identity.
    """

    def __init__(self, encoder: Sequence[int] = (8, 16, 32, 64, 64), pool: int = 2):
        super().__init__()
        widths = [int(w) for w in encoder]
        layers: List[nn.Module] = []
        channels = 2
        for level, out in enumerate(widths):
            layers.append(ConvBlock(channels, out, stride=2))
            if level >= 2:  # from the third level on, a stride-1 convolution refines each level
                layers.append(ConvBlock(out, out))
            channels = out
        self.encoder = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(int(pool))
        self.fully_connected = nn.Linear(channels * int(pool) ** 3, 12)
        nn.init.zeros_(self.fully_connected.weight)
        nn.init.zeros_(self.fully_connected.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.encoder(torch.cat([fixed, moving], dim=1)))
        numbers = self.fully_connected(features.flatten(1))
        linear = numbers[:, :9].view(-1, 3, 3)
        translation = numbers[:, 9:].view(-1, 3, 1)
        eye = torch.eye(3, device=numbers.device, dtype=numbers.dtype).expand_as(linear)
        return torch.cat([eye + linear, translation], dim=2)


class DenseSubnetwork(nn.Module):
    """The dense deformable registration subnetwork: ``(fixed, moving) -> flow (B, 3, D, H, W)``.

    Encoder: stride-2 convolutions ``conv_1 .. conv_L`` (channels ``width * 2^l``), each from the
    third on followed by a stride-1 convolution. Decoder, from the coarsest level up: a 3-channel
    flow prediction ``pred_l`` (3x3x3 convolution) is upsampled by a transposed convolution and
    concatenated with the upsampled features (transposed convolution) and the encoder's skip; the
    last transposed convolution (zero-initialised) gives the flow at input size. Input sides must
    divide by ``2 ** levels``.
    """

    def __init__(self, encoder: Sequence[int] = (16, 32, 32, 64)):
        super().__init__()
        widths = [int(w) for w in encoder]
        self.size_multiple = 2 ** len(widths)
        self.down = nn.ModuleList()
        channels = 2
        for level, out in enumerate(widths):
            block = [ConvBlock(channels, out, stride=2)]
            if level >= 2:
                block.append(ConvBlock(out, out))
            self.down.append(nn.Sequential(*block))
            channels = out
        # decoder levels L-1 .. 1: predict, upsample flow and features, concatenate with skip
        self.predict = nn.ModuleList()
        self.upsample_flow = nn.ModuleList()
        self.upsample_features = nn.ModuleList()
        for skip in reversed(widths[:-1]):
            self.predict.append(nn.Conv3d(channels, 3, 3, 1, 1))
            self.upsample_flow.append(nn.ConvTranspose3d(3, 3, 4, 2, 1))
            self.upsample_features.append(UpBlock(channels, skip))
            channels = skip + skip + 3
        self.flow = nn.ConvTranspose3d(channels, 3, 4, 2, 1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        skips = []
        x = torch.cat([fixed, moving], dim=1)
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = skips.pop()
        for predict, up_flow, up_features in zip(self.predict, self.upsample_flow,
                                                 self.upsample_features):
            x = torch.cat([skips.pop(), up_features(x), up_flow(predict(x))], dim=1)
        return self.flow(x)


class VTN(nn.Module):
    """The cascade. ``forward(fixed, moving)`` -> the composed displacement ``(B, 3, D, H, W)`` in
    voxels of the input grid (``warped = warp(moving, u)``); :meth:`stages` gives every stage."""

    def __init__(self, variant: str = "ADDD", dense_encoder: Sequence[int] = (16, 32, 32, 64),
                 affine_encoder: Sequence[int] = (8, 16, 32, 64, 64), affine_pool: int = 2,
                 invertibility: bool = False, similarity: str = "cc",
                 invertibility_weight: float = 1e-3):
        super().__init__()
        self.variant = check_variant(variant)
        if similarity not in SIMILARITIES:
            raise UserInputError(f"VTN similarity '{similarity}' is not one of "
                                 f"{', '.join(SIMILARITIES)}")
        # training choices, kept with the weights (and in the checkpoint's config)
        self.invertibility = bool(invertibility)
        self.invertibility_weight = float(invertibility_weight)
        self.similarity = similarity
        self.subnetworks = nn.ModuleList(
            AffineSubnetwork(affine_encoder, affine_pool) if kind == "A"
            else DenseSubnetwork(dense_encoder) for kind in self.variant)
        self.size_multiple = 2 ** len(dense_encoder)

    def stages(self, fixed: torch.Tensor, moving: torch.Tensor,
               count: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
        """Run the first ``count`` stages (all by default). Each entry has ``kind`` ("A"/"D"),
        ``flow`` (this stage's own flow), ``displacement`` (flows composed so far), ``warped``
        (the original moving image warped once by ``displacement``) and, for the affine stage,
        ``matrix`` ``[I + A | b]`` ``(B, 3, 4)``."""
        shape = tuple(fixed.shape[2:])
        results: List[Dict[str, torch.Tensor]] = []
        warped, displacement, affine = moving, None, None
        for kind, subnetwork in list(zip(self.variant, self.subnetworks))[:count]:
            entry: Dict[str, torch.Tensor] = {"kind": kind}
            if kind == "A":
                matrix = subnetwork(fixed, warped)
                flow = affine_displacement(matrix, shape)
                entry["matrix"] = matrix
                if displacement is None:
                    displacement, affine = flow, matrix
                else:
                    displacement, affine = compose(displacement, flow), None
            else:
                flow = subnetwork(fixed, warped)
                if displacement is None:
                    displacement = flow
                elif affine is not None:
                    # f_A * f = f + f_A(x + f(x)) = f_A + (I + A) f: exact, no interpolation
                    displacement = displacement + torch.einsum("bij,bj...->bi...",
                                                               affine[:, :, :3], flow)
                else:
                    displacement = compose(displacement, flow)
                affine = None
            warped = warp(moving, displacement)  # always from the original moving image
            entry.update(flow=flow, displacement=displacement, warped=warped)
            results.append(entry)
        return results

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor,
                count: Optional[int] = None) -> torch.Tensor:
        return self.stages(fixed, moving, count)[-1]["displacement"]


def build_network(config: Dict) -> VTN:
    config = dict(DEFAULT_CONFIG, **(config or {}))
    return VTN(config["variant"], config["dense_encoder"], config["affine_encoder"],
               config["affine_pool"], config["invertibility"], config["similarity"],
               config["invertibility_weight"])


# ------------------------------------------------------------------------------------ training
def stage_weights(variant: str) -> List[Dict[str, float]]:
    """Table I loss weights for each stage of ``variant`` (see the module docstring)."""
    variant = check_variant(variant)
    dense_total = variant.count("D")
    weights, dense_index = [], 0
    for kind in variant:
        if kind == "A":
            weights.append({"similarity": AFFINE_SIMILARITY_WEIGHT,
                            "determinant": AFFINE_DETERMINANT_WEIGHT,
                            "orthogonality": AFFINE_ORTHOGONALITY_WEIGHT})
        else:
            from_end = dense_total - 1 - dense_index
            similarity = (DENSE_SIMILARITY_WEIGHTS[-1 - from_end]
                          if from_end < len(DENSE_SIMILARITY_WEIGHTS) else 0.0)
            weights.append({"similarity": similarity, "total_variation": DENSE_TV_WEIGHT})
            dense_index += 1
    return weights


def cascade_loss(variant: str, fixed: torch.Tensor, stages: Sequence[Dict[str, torch.Tensor]],
                 similarity: str = "cc") -> Tuple[torch.Tensor, Dict]:
    """The Table I loss of ``stages`` (from ``VTN.stages``) registering them to ``fixed``."""
    similarity_loss = SIMILARITIES[similarity]
    total = fixed.new_zeros(())
    terms: Dict[str, float] = {}
    for index, (stage, weights) in enumerate(zip(stages, stage_weights(variant)), start=1):
        name = f"{index}{stage['kind']}"
        values = {"similarity": lambda: similarity_loss(fixed, stage["warped"]),
                  "total_variation": lambda: total_variation_loss(stage["flow"]),
                  "determinant": lambda: affine_determinant_loss(stage["matrix"][:, :, :3]),
                  "orthogonality": lambda: affine_orthogonality_loss(stage["matrix"][:, :, :3])}
        for key, weight in weights.items():
            if weight == 0 and key != "similarity":
                continue
            value = values[key]()
            terms[f"{name}_{key}"] = float(value.detach())
            if weight:
                total = total + weight * value
    return total, terms


def rescored(stages: List[Dict[str, torch.Tensor]],
             scored_moving: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Each stage's ``warped`` image recomputed from ``scored_moving`` (the image the loss scores,
    :func:`scored_pair`, when it is not the image the network saw)."""
    return [dict(stage, warped=warp(scored_moving, stage["displacement"])) for stage in stages]


def training_loss(network: VTN, fixed: torch.Tensor, moving: torch.Tensor,
                  batch: Optional[Dict] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The trainer's ``loss_fn`` hook: Table I losses, plus the invertibility loss ("+inv").

    With invertibility the pair is registered both ways in one batch of ``2B`` (fixed to moving
    and moving to fixed), the Table I losses are averaged over both directions, and
    ``w * L_inv(f12, f21)`` is added: the paper's unnormalised sum (``losses.invertibility_loss``)
    and, by default, its weight ``w = 1e-3`` (config ``invertibility_weight``). Second-contrast synthetic pairs are replaced by
    same-contrast ones (:func:`same_contrast`).
    """
    moving = same_contrast(fixed, moving, batch)
    scored_fixed, scored_moving = scored_pair(fixed, moving, batch)
    if not network.invertibility:
        stages = network.stages(fixed, moving)
        if scored_moving is not moving:
            stages = rescored(stages, scored_moving)
        report_field(batch, stages[-1]["displacement"])
        return cascade_loss(network.variant, scored_fixed, stages, network.similarity)
    count = fixed.shape[0]
    both_fixed = torch.cat([fixed, moving], dim=0)
    both_moving = torch.cat([moving, fixed], dim=0)
    stages = network.stages(both_fixed, both_moving)
    if scored_moving is not moving:
        stages = rescored(stages, torch.cat([scored_moving, scored_fixed], dim=0))
    total, terms = cascade_loss(network.variant, torch.cat([scored_fixed, scored_moving], dim=0),
                                stages, network.similarity)
    final = stages[-1]["displacement"]
    report_field(batch, final[:count])
    inverse = invertibility_loss(final[:count], final[count:])
    terms["invertibility"] = float(inverse.detach())
    return total + network.invertibility_weight * inverse, terms


# ------------------------------------------------------------------------------------ inference
def select_checkpoint(spec: MethodSpec, variant: Optional[str], device="cpu") -> VTN:
    """The network for a requested variant: ``vtn-<VARIANT>.pt`` when it exists (the paper's
    ablation trains each variant on its own), the shipped ``vtn.pt`` when it *is* that variant,
    and otherwise a one-line error naming the training command.

    The first stages of the shipped ADDD are never passed off as AD or ADD: a stage of a cascade
    was trained to hand its residual to the next one (Table I gives the first dense stage no
    similarity term at all), which is not what a separately trained AD or ADD learns. Running ADDD
    truncated after stage k is an analysis (``VTN.stages``; benchmarks/vtn_stages.py), reported
    under that name.
    """
    if variant is None:
        return load_network(spec, device)
    variant = check_variant(variant)
    own = find_checkpoint(f"vtn-{variant}.pt")
    if own is not None:
        network = load_network(spec, device, own)
        if network.variant != variant:
            raise UserInputError(f"checkpoint '{own}' holds VTN variant '{network.variant}', "
                                 f"not '{variant}'")
        return network
    network = load_network(spec, device)
    if network.variant == variant:
        return network
    raise UserInputError(
        f"VTN variant '{variant}' needs its own checkpoint vtn-{variant}.pt, not found in "
        f"{', '.join(checkpoint_folders())} (the shipped {spec.checkpoint} is {network.variant}, "
        f"and its first stages are not a trained {variant}); train one with: python -m training "
        f"train --method vtn --config '{{\"variant\": \"{variant}\"}}' --output "
        f"Resources/checkpoints/vtn-{variant}.pt")


def run(inputs: RegistrationInputs, spec: MethodSpec) -> torch.Tensor:
    """Forward the cascade on the 4 mm working grid (``base.run_network``), with the variant
    from ``inputs.options["variant"]`` (``--variant``)."""
    network = select_checkpoint(spec, inputs.options.get("variant"), inputs.fixed.device)
    return run_network(inputs, spec, network, label=f"{spec.name} {network.variant}")


SPEC = register_method(MethodSpec(
    name="vtn",
    title="VTN (Volume Tweening Network: affine + cascaded dense subnetworks)",
    paper="Zhao et al., Unsupervised 3D End-to-End Medical Image Registration with Volume "
          "Tweening Network, IEEE JBHI 2020",
    description="An affine subnetwork then three dense encoder-decoders, each registering the "
                "fixed image to the re-warped moving image; flows composed. Runs on its "
                "checkpoint's grid (2 mm); add --refine for detail. --variant X runs a "
                "separately trained vtn-X.pt.",
    run=run,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG),
    checkpoint="vtn.pt",
    working_spacing_mm=4.0,
    size_multiple=16,
    # with "+inv" every pair is registered both ways: half the batch of the one-way methods
    training={"loss_fn": training_loss, "recipe_losses": True, "lr": 1e-3, "batch_size": 2,
              "curriculum": {"spacing_mm": 8.0, "fraction": 0.6, "batch_size": 4}},
    estimated_seconds={"2mm": 1.5, "1mm": 4.0},
    variants=VARIANTS,
))
