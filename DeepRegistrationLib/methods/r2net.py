"""R2Net: a U-Net predicts an initial velocity, Lipschitz-continuous residual blocks integrate it.

Joshi and Hong, "R2Net: Efficient and flexible diffeomorphic image registration using Lipschitz
continuous residual networks", Medical Image Analysis 89, 2023 (and MIDL 2022, PMLR 172:605-617).

The method, as in the paper and its public code (github.com/ankitajoshi15/R2Net):

- *Initial velocity.* The moving and fixed images are concatenated and passed through a U-Net
  (3x3x3 stride-1 convolutions with leaky ReLU, stride-2 convolutions to downsample, transposed
  convolutions and skip connections to come back); a 3x3x3 convolution maps its features to a
  3-channel field ``v_0`` (voxels). This is the non-probabilistic R2Net: no sampling, no KL term.
- *Integration by a residual network.* A ResNet is read as the forward-Euler discretisation of an
  ordinary differential equation. ``N = 7`` LC-ResNet blocks update the field,

      v_{t+1} = v_t + F(v_t; theta_t),   F(v) = h * tanh(SN-conv_1x1x1(lrelu(SN-conv_3x3x3(v)))),

  where SN-conv is a spectrally normalised convolution without bias and ``h = 1/2`` the step
  scaling of the public code. ``F`` plays the role of the velocity at time ``t``: with one set of
  weights shared by every block (``theta_t = theta``) it is stationary -- **SVF-R2Net**
  (``r2net-svf``); with separate weights per block it varies with time -- **NSVF-R2Net**
  (``r2net-nsvf``).
- *What the integration produces.* The state after the last block is the displacement: the
  deformation is ``phi(x) = x + v_N(x)`` (the public code adds the identity grid to ``v_7``), and
  the source is warped with linear interpolation, ``warped = moving o phi``
  (``spatial.warp(moving, v_N)``). The states are not summed or averaged, and there is no scaling
  and squaring: the N blocks *are* the integrator, N cheap 3-channel convolutions instead of
  N compositions of the field with itself. What they integrate is their own learned ODE
  ``dv/dt = F(v)`` started at ``v_0`` -- not the exponential of ``v_0``. On the shipped SVF
  checkpoint the 7 steps agree with 70 finer Euler steps of that ODE to 0.01-0.02 voxel, but
  ``v_N`` is 0.3-0.6 voxel (mean) away from the scaling-and-squaring exponential of ``v_0``,
  about as far as it is from ``v_0`` itself, while the exponential stays within 0.03-0.13 voxel
  of ``v_0`` (benchmarks/lcresnet_convergence.py, docs/evaluation/lcresnet-convergence/).
- *Lipschitz continuity.* Spectral normalisation makes each convolution 1-Lipschitz; leaky ReLU
  and tanh are 1-Lipschitz, so ``Lip(F) <= h = 1/2 < 1``. Each block ``v -> v + F(v)`` is then an
  invertible map with an inverse of Lipschitz constant at most ``1 / (1 - h)`` (Behrmann et al.,
  i-ResNet, 2019), and every step's update is bounded (``|F| <= h`` voxel per component) and
  smooth. That is a property of the map ``v -> v_N`` on fields; it does not make ``x + v_N(x)`` a
  diffeomorphism (a rough ``v_0`` folds already, and a step can add folding), which is what the
  folding loss is for.
- *Loss.* ``L = MSE(F, M o phi) + lambda * mean(1/2 (|J| - J))``, ``J = det(I + grad v_N)`` --
  ``losses.mse_loss`` and ``losses.negative_jacobian_loss`` (the identity is added once: the
  public code differentiates the *position* field ``x + v_7`` and then adds the identity again,
  so it penalises ``det(2I + grad u) < 0`` and almost never fires). The public code takes ``J``
  from forward differences; ``losses.negative_jacobian_loss`` averages the term over all 8
  one-sided (forward/backward per axis) determinants of each voxel -- the forward one among
  them -- so a fold that alternates every voxel is penalised too (until commit b12abcb it used
  central differences, which cannot see such folds). ``NGF`` (``losses.ngf_loss``) replaces MSE
  with ``config["similarity"] = "ngf"`` for CT-like pairs.

Spectral norm of a 3-D convolution (``config["lipschitz"]``). ``torch.nn.utils.parametrizations.
spectral_norm`` -- like the paper's Keras ``ConvSN3D`` -- divides the kernel by the largest singular
value of the kernel reshaped to an ``out x (in*27)`` matrix. For a 1x1x1 convolution that *is* its
operator norm, but for a 3x3x3 one it bounds the operator norm only up to a factor ``sqrt(27)``
(1.7 to 2.4, median 2.0, for 200 random 3-channel kernels), so ``Lip(F) <= h`` would not
hold. The default
``"operator"`` divides each kernel by the operator norm of the convolution as the block applies it
(:class:`OperatorSpectralNorm`): the exact norm of the convolution away from the border -- the
largest singular value of the kernel's transfer matrix ``K(w) = sum_s W_s exp(-i w.s)`` over
spatial frequencies ``w`` (FFT on a 16^3 grid) -- or, if larger, the gain at the border found by
power iteration on the padded convolution itself. ``"matrix"`` is the paper's normalisation, kept
for comparison. The blocks pad a field by *replicating* its border (the public code pads with
zeros): zero padding makes a field look as if it dropped to zero outside the grid, and seven
random zero-padded SVF blocks folded smooth 2-voxel fields at the border (min det J -0.2 to -0.5)
where replicate-padded ones keep det J > 0.4 (docs/methods/r2net.md).

Differences from the paper (docs/methods/r2net.md): a 4 mm working grid and a narrow U-Net for 2
CPU cores (``base.run_network`` upsamples the field; ``--refine`` polishes at full resolution);
synthetic deformations of a few real volumes instead of hundreds of scans; second-contrast
synthetic pairs trained in the fixed image's contrast (a same-contrast similarity); and the
shipped checkpoints are trained with local NCC (5-voxel windows, as vm-diff) instead of MSE --
``config["similarity"] = "mse"`` is the paper's loss. On our intensity-augmented synthetic pairs
MSE did not start learning in a CPU budget (8 mm validation: ground-truth error 7.3 -> 7.6 mm
after 200 steps, where LNCC brought vm-diff from 7.3 to about 5 mm), and with the same U-Net and
loss as vm-diff the comparison isolates what the paper is about: LC-ResNet integration against
scaling and squaring.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..errors import UserInputError
from ..losses import diffusion_loss, negative_jacobian_loss, similarity_loss
from ..spatial import warp
from .base import (MethodSpec, register_method, report_field, run_network, same_contrast,
                   scored_pair)
from .blocks import UNet, flow_head

# The public code's folding weight is 0.001 on a *sum* over the voxels of its 160x160x128 volumes;
# the library's negative_jacobian_loss is a *mean*, so the same balance per voxel is
# 0.001 * 160 * 160 * 128 (about 3.3e3). The term is zero wherever det J > 0, so a large weight
# only acts on folded voxels.
FOLDING_WEIGHT = 1e-3 * 160 * 160 * 128
# diffusion regulariser on the displacement (not in the paper, whose only regulariser is the
# folding loss): with LNCC the unregularised U-Net matched intensities with rough fields (8 mm
# validation after 200 steps: NCC 0.97 but ground-truth error 7.3 -> 8.6 mm, SDlogJ 0.28).
# The weight is vm-diff's, so the comparison of the two isolates the integration.
SMOOTHNESS_WEIGHT = 1.0
STEP_SCALE = 0.5        # h: tanh(...) / 2 in every block of the public code
BLOCKS = 7              # N
FREQUENCY_GRID = 16     # spatial frequencies per axis at which a kernel's transfer matrix is taken
BORDER_GRID = 16        # side of the volume on which the border modes are found
CHANNELS_LAST = torch.channels_last_3d

# as vm-diff's: little noise (it dominates LNCC's local variance in the zero background)
TRAINING_SYNTH = {"noise_max": 0.01}
DEFAULT_CONFIG = {"encoder": [16, 32, 32, 32], "features": 16, "blocks": BLOCKS,
                  "stationary": True, "block_channels": 3, "step_scale": STEP_SCALE,
                  "lipschitz": "operator", "similarity": "lncc", "folding_weight": FOLDING_WEIGHT,
                  "smoothness_weight": SMOOTHNESS_WEIGHT}
# options of the similarity; LNCC's window as vm-diff's (20 mm on the 4 mm grid)
SIMILARITY_OPTIONS = {"lncc": {"window": 5}}
LIPSCHITZ_MODES = ("operator", "matrix")


# ----------------------------------------------------------------------- spectral normalisation
def conv3d_cpu(x: torch.Tensor, weight: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """``F.conv3d(x, weight, padding=padding)``, computed the way oneDNN is fast on a CPU.

    With fewer than 8 input channels (a 3-channel field) PyTorch falls back to a slow generic
    convolution; zero channels appended to the input and the kernel (the result is the same) and
    a channels-last layout make a block's forward + backward about 5x faster on 2 cores.
    """
    extra = (-x.shape[1]) % 8
    if extra:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, extra))
        weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, extra))
    return F.conv3d(x.contiguous(memory_format=CHANNELS_LAST), weight, padding=padding)


def conv_operator_norm(weight: torch.Tensor, grid: int = FREQUENCY_GRID) -> torch.Tensor:
    """Operator norm (largest gain on any field) of a stride-1 convolution with kernel ``weight``
    ``(out, in, k, k, k)`` on an unbounded grid: ``max_w sigma_max(K(w))`` for the transfer matrix
    ``K(w) = sum_s W_s exp(-i w . s)``, taken at ``grid``^3 frequencies (a real FFT of the
    zero-padded kernel). A 1x1x1 kernel has one transfer matrix: its plain spectral norm."""
    if weight.shape[2:].numel() == 1:
        return torch.linalg.matrix_norm(weight.flatten(1), ord=2)
    spectrum = torch.fft.rfftn(weight, s=(grid,) * 3, dim=(2, 3, 4))
    spectrum = spectrum.permute(2, 3, 4, 0, 1)                    # (..., out, in)
    gram = spectrum.mH @ spectrum                                 # (..., in, in), Hermitian
    return torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(1e-12).sqrt()


def padded_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The blocks' convolution: replicate padding (a field continues flat beyond the border, as
    ``spatial.warp`` assumes), then a 'valid' stride-1 convolution."""
    pad = weight.shape[-1] // 2
    if pad:
        x = F.pad(x, (pad,) * 6, mode="replicate")
    return conv3d_cpu(x, weight)


class OperatorSpectralNorm(nn.Module):
    """Parametrisation ``W -> W / sigma(W)``, ``sigma`` the operator norm of ``x -> padded_conv(x,
    W)``: a convolution of Lipschitz constant 1.

    ``sigma`` is the larger of two estimates. Away from the border the operator is a convolution,
    whose norm :func:`conv_operator_norm` gives exactly from the kernel's spectrum. Replicate
    padding counts border voxels more than once and can add up to about 20% (measured on random
    kernels), in modes that live at the faces and corners of the grid; those are found by power
    iteration on the padded operator itself (``padded_conv`` and its adjoint by autograd) on a
    small ``grid``^3 volume, whose vector is kept between steps like
    ``torch.nn.utils.parametrizations.spectral_norm``'s (one iteration per training forward pass,
    ``initial_iterations`` at construction). Differentiable in ``W`` through both estimates.
    """

    def __init__(self, weight: torch.Tensor, grid: int = BORDER_GRID,
                 iterations: int = 1, initial_iterations: int = 50):
        super().__init__()
        self.iterations = int(iterations)
        start = torch.randn((1, weight.shape[1], grid, grid, grid), dtype=weight.dtype,
                            device=weight.device)
        self.register_buffer("vector", start / start.norm())
        self.power_iteration(weight, initial_iterations)

    def power_iteration(self, weight: torch.Tensor, iterations: int) -> None:
        """``u <- A^T A u / |A^T A u|`` for ``A = padded_conv(., weight)``; the adjoint by
        autograd on a small private graph (10x faster than ``torch.func.vjp`` here)."""
        weight = weight.detach()
        vector = self.vector.detach()
        with torch.enable_grad():
            for _ in range(iterations):
                vector = vector.detach().requires_grad_(True)
                image = padded_conv(vector, weight)
                (vector,) = torch.autograd.grad(image, vector, image.detach())
                vector = vector / vector.norm().clamp_min(1e-12)
        with torch.no_grad():
            self.vector.copy_(vector)

    def converge(self, weight: torch.Tensor, tolerance: float = 1e-4, min_iterations: int = 50,
                 max_iterations: int = 500) -> None:
        """Power iteration until the border estimate settles. One iteration per training step
        can leave it short of the top mode on a block trained only briefly (a phase-2 MS-R2Net
        block after 100 steps: norm 1.037), and an estimate below the true norm lets the
        block's Lipschitz constant exceed its bound. From a random vector the estimate is
        within 0.1 % after 20-50 iterations (it can stall on the way, hence ``min_iterations``
        before the relative ``tolerance`` is checked every 10)."""
        if weight.shape[2:].numel() == 1:
            return
        self.power_iteration(weight, min_iterations)
        with torch.no_grad():
            previous = float(padded_conv(self.vector, weight.detach()).norm())
        for _ in range((max_iterations - min_iterations) // 10):
            self.power_iteration(weight, 10)
            with torch.no_grad():
                current = float(padded_conv(self.vector, weight.detach()).norm())
            if abs(current - previous) <= tolerance * max(current, 1e-12):
                return
            previous = current

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape[2:].numel() == 1:   # no padding: the matrix norm is exact
            return conv_operator_norm(weight)
        border = padded_conv(self.vector, weight).norm()
        return torch.maximum(conv_operator_norm(weight), border)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and weight.shape[2:].numel() > 1 \
                and not torch.is_inference_mode_enabled():
            self.power_iteration(weight, self.iterations)
        return weight / self.sigma(weight)


def converge_operator_norms(network: nn.Module) -> nn.Module:
    """Converge every :class:`OperatorSpectralNorm` estimate of ``network`` (see
    :meth:`OperatorSpectralNorm.converge`). The trainer calls it before each validation, so a
    saved checkpoint carries converged vectors and loading needs no iterations (checking them
    would cost seconds per load for r2net-nsvf and ms-r2net). Returns ``network``."""
    for module in network.modules():
        if parametrize.is_parametrized(module, "weight"):
            for parametrization in module.parametrizations["weight"]:
                if isinstance(parametrization, OperatorSpectralNorm):
                    parametrization.converge(module.parametrizations["weight"].original)
    return network


def spectrally_normalised(conv: nn.Conv3d, mode: str = "operator") -> nn.Conv3d:
    """``conv`` with its kernel normalised: ``"operator"`` by the norm of the padded convolution
    (:class:`OperatorSpectralNorm`), ``"matrix"`` by that of the reshaped kernel matrix
    (``torch.nn.utils.parametrizations.spectral_norm``, as the paper's code)."""
    if mode == "operator":
        parametrize.register_parametrization(conv, "weight", OperatorSpectralNorm(conv.weight))
    elif mode == "matrix":
        nn.utils.parametrizations.spectral_norm(conv)
    else:
        raise UserInputError(f"R2Net 'lipschitz' must be one of {', '.join(LIPSCHITZ_MODES)}, "
                             f"not '{mode}'")
    return conv


# ---------------------------------------------------------------------------- LC-ResNet blocks
class LCResBlock(nn.Module):
    """One Lipschitz-continuous residual block: ``v -> v + F(v)``,
    ``F(v) = h * tanh(SN-conv_1x1x1(lrelu(SN-conv_3x3x3(v))))`` with ``Lip(F) <= h``."""

    def __init__(self, channels: int = 3, hidden: int = 3, step_scale: float = STEP_SCALE,
                 lipschitz: str = "operator"):
        super().__init__()
        self.conv1 = spectrally_normalised(
            nn.Conv3d(channels, hidden, 3, 1, 1, bias=False, padding_mode="replicate"), lipschitz)
        self.conv2 = spectrally_normalised(nn.Conv3d(hidden, channels, 1, bias=False), lipschitz)
        self.step_scale = float(step_scale)

    def residual(self, v: torch.Tensor) -> torch.Tensor:
        """``F(v)``: the velocity of this step (voxels), at most ``h`` per component."""
        hidden = F.leaky_relu(padded_conv(v, self.conv1.weight), 0.2)
        return self.step_scale * torch.tanh(conv3d_cpu(hidden, self.conv2.weight))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v + self.residual(v)


class LCResNet(nn.Module):
    """``N`` LC-ResNet blocks, one forward-Euler step each: ``v_0 -> v_N``.

    ``stationary=True`` (SVF): one block applied ``N`` times -- the same parameter tensors at every
    step, so the parameter count does not depend on ``N``. ``stationary=False`` (NSVF): ``N``
    blocks with their own parameters.
    """

    def __init__(self, steps: int = BLOCKS, stationary: bool = True, hidden: int = 3,
                 step_scale: float = STEP_SCALE, lipschitz: str = "operator"):
        super().__init__()
        if int(steps) < 1:
            raise UserInputError("R2Net needs at least one LC-ResNet block")
        self.steps = int(steps)
        self.stationary = bool(stationary)
        count = 1 if self.stationary else self.steps
        self.blocks = nn.ModuleList(LCResBlock(3, hidden, step_scale, lipschitz)
                                    for _ in range(count))

    @property
    def step_blocks(self) -> List[LCResBlock]:
        """The block used at each of the ``N`` steps (the same object ``N`` times for SVF)."""
        return [self.blocks[0]] * self.steps if self.stationary else list(self.blocks)

    def forward(self, v0: torch.Tensor, trajectory: bool = False):
        states = [v0]
        with parametrize.cached():  # normalise each kernel once per pass, not once per step
            for block in self.step_blocks:
                states.append(block(states[-1]))
        return states if trajectory else states[-1]


# ----------------------------------------------------------------------------------- the network
class R2Net(nn.Module):
    """``forward(fixed, moving)`` -> displacement ``v_N`` ``(B, 3, D, H, W)`` in input-grid voxels
    (``warped = warp(moving, v_N)``); input sides must divide by ``size_multiple``."""

    def __init__(self, encoder: Sequence[int] = (16, 32, 32, 32), features: int = 16,
                 blocks: int = BLOCKS, stationary: bool = True, block_channels: int = 3,
                 step_scale: float = STEP_SCALE, lipschitz: str = "operator",
                 similarity: str = "lncc", folding_weight: float = FOLDING_WEIGHT,
                 smoothness_weight: float = SMOOTHNESS_WEIGHT):
        super().__init__()
        self.unet = UNet(2, tuple(encoder), features)
        self.flow = flow_head(features)   # v_0 starts near zero: the identity at initialisation
        self.integrate = LCResNet(blocks, stationary, block_channels, step_scale, lipschitz)
        self.size_multiple = self.unet.size_multiple
        similarity_loss(similarity)       # fail early on an unknown name
        # training choices, kept with the weights (and in the checkpoint's config)
        self.similarity = similarity
        self.folding_weight = float(folding_weight)
        self.smoothness_weight = float(smoothness_weight)

    def velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The initial velocity ``v_0`` (voxels) for the pair (moving first, as in the code)."""
        pair = torch.cat([moving, fixed], dim=1).contiguous(memory_format=CHANNELS_LAST)
        return self.flow(self.unet(pair))  # channels-last: about 2x faster convolutions on a CPU

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.integrate(self.velocity(fixed, moving))


def build_network(config: Dict) -> R2Net:
    config = dict(DEFAULT_CONFIG, **(config or {}))
    return R2Net(config["encoder"], config["features"], config["blocks"], config["stationary"],
                 config["block_channels"], config["step_scale"], config["lipschitz"],
                 config["similarity"], config["folding_weight"], config["smoothness_weight"])


# -------------------------------------------------------------------------------------- training
def registration_loss(displacement: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                      similarity: str = "mse", folding_weight: float = FOLDING_WEIGHT,
                      smoothness_weight: float = 0.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``S(F, M o phi) + lambda * mean(max(-det J, 0)) [+ mu * Diffusion(u)]`` and its terms
    (for logging); the defaults are the paper's loss."""
    options = SIMILARITY_OPTIONS.get(similarity, {})
    match = similarity_loss(similarity)(fixed, warp(moving, displacement), **options)
    folding = negative_jacobian_loss(displacement)
    total = match + folding_weight * folding
    terms = {similarity: float(match.detach()), "folding": float(folding.detach())}
    if smoothness_weight:
        smoothness = diffusion_loss(displacement)
        total = total + smoothness_weight * smoothness
        terms["diffusion"] = float(smoothness.detach())
    return total, terms


def network_loss(network, displacement: torch.Tensor, fixed: torch.Tensor,
                 moving: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
    """:func:`registration_loss` with the loss settings kept in ``network``'s config."""
    return registration_loss(displacement, fixed, moving, network.similarity,
                             network.folding_weight, network.smoothness_weight)


def training_loss(network: R2Net, fixed: torch.Tensor, moving: torch.Tensor,
                  batch: Optional[Dict] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The trainer's ``loss_fn`` hook (training/train.py): similarity (LNCC; the paper's MSE, or
    NGF, via the config) plus the folding loss (plus the diffusion term, if weighted)."""
    moving = same_contrast(fixed, moving, batch)
    displacement = report_field(batch, network(fixed, moving))
    return network_loss(network, displacement, *scored_pair(fixed, moving, batch))


# -------------------------------------------------------------------------------------- methods
PAPER = ("Joshi and Hong, R2Net: Efficient and flexible diffeomorphic image registration using "
         "Lipschitz continuous residual networks, Medical Image Analysis 2023")

SVF_SPEC = register_method(MethodSpec(
    name="r2net-svf",
    title="SVF-R2Net (U-Net velocity + shared Lipschitz residual blocks)",
    paper=PAPER,
    description="A U-Net predicts an initial velocity on its checkpoint's grid (2 mm); 7 "
                "Lipschitz-continuous residual blocks with shared weights (a stationary "
                "velocity) integrate it into the displacement. One forward pass; add --refine "
                "for detail.",
    run=run_network,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG, stationary=True),
    checkpoint="r2net-svf.pt",
    working_spacing_mm=4.0,
    size_multiple=16,
    training={"loss_fn": training_loss, "recipe_losses": True, "lr": 1e-3, "batch_size": 4,
              "synth": TRAINING_SYNTH},
    estimated_seconds={"2mm": 1.5, "1mm": 4.0},
))

NSVF_SPEC = register_method(MethodSpec(
    name="r2net-nsvf",
    title="NSVF-R2Net (U-Net velocity + time-varying Lipschitz residual blocks)",
    paper=PAPER,
    description="A U-Net predicts an initial velocity on a 4 mm grid; 7 Lipschitz-continuous "
                "residual blocks with their own weights (a time-varying velocity) integrate it "
                "into the displacement. One forward pass; add --refine for detail.",
    run=run_network,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG, stationary=False),
    checkpoint="r2net-nsvf.pt",
    working_spacing_mm=4.0,
    size_multiple=16,
    training={"loss_fn": training_loss, "recipe_losses": True, "lr": 1e-3, "batch_size": 4,
              "synth": TRAINING_SYNTH},
    estimated_seconds={"2mm": 1.5, "1mm": 4.0},
))
