"""SUITS: learned multi-modal features driving a regularised Gauss-Newton descent, trained end to
end through a differentiable linear solver.

Blendowski, Hansen, Heinrich, "Weakly-supervised learning of multi-modal features for
regularised iterative descent in 3D image registration", Medical Image Analysis 67, 2021. No
public code exists; the adjoint of the linear solve follows the same group's later
differentiable Gauss-Newton layer. docs/methods/suits.md lists what follows the paper and what
does not.

The method:

- *Features* (the paper's Table 1). A Y-shaped CNN maps each image to 12 channels in [0, 1], as
  many as MIND-SSC has. Layers 1-2 are separate for the fixed and the moving modality, layers 3-5
  shared: 1->16 (5x5x5, dilation 2), 16->32 (3x3x3), 32->32 (3x3x3, stride 2), 32->32, 32->12;
  instance normalisation and ReLU after layers 1-4, a sigmoid after layer 5. The stride halves the
  grid: the features, and the field, live on the *feature grid*.
- *Regularised iterative descent.* With fixed features ``R_F`` and the features ``R_M`` of the
  moving image warped by the current field ``u`` (feature-grid voxels), one Brox-style linearised
  step ``du`` minimises

      1/2 sum_c || r_c + grad R_M,c . du ||^2 + lambda/2 (u + du)^T L (u + du),
      r_c = R_M,c - R_F,c,

  ``L`` the 6-neighbour graph Laplacian of the grid. Setting the gradient to zero gives one
  linear system per iteration,

      A du = b,   A = sum_c grad R_c grad R_c^T + lambda L + eps I,
                  b = -sum_c r_c grad R_c - lambda L u,

  (the ``-lambda L u`` term regularises the whole field, not only the increment; ``eps`` keeps
  ``A`` positive definite where the features are flat). ``u <- u + du`` for ``K`` iterations (the
  paper: 15); every iteration warps the moving *grey-value* image by the upsampled field and
  computes its features again. The field is upsampled from the feature grid trilinearly and
  smoothed by a small box filter, an approximation of the paper's B-spline interpolation.
- *Differentiable solve.* :class:`LinearSolve` solves ``A z = b`` matrix-free by conjugate
  gradients with a block-Jacobi preconditioner (the 3x3 block of every voxel) to a fixed relative
  tolerance. Its backward pass solves the adjoint system ``A g_b = g_z`` (``A`` is symmetric)
  instead of differentiating the CG iterations, and -- with ``matrix_grad``, off by default as in
  the paper -- gives the data-term blocks the gradient ``-sym(g_b z^T)`` per voxel.
- *Training* (:func:`training_loss`). Phase ``mind``: both streams regress MIND-SSC descriptors of
  their own image at the feature grid (L1) -- the network after this phase is the *replica*.
  Phase ``suits``: end to end with weak supervision by label maps: draw ``k_back`` in 1..K, run
  ``k_back - 1`` iterations of the same solver driven by the one-hot label maps without gradients,
  then one tracked iteration from the features, and minimise the cross-entropy of the moving
  one-hot labels warped by the result against the fixed labels.

Additive updates are not diffeomorphic: the folding of SUITS fields is reported as measured
(``--refine`` adds a diffeomorphic instance optimisation on top).

Where this differs from the paper (docs/methods/suits.md has the full list): by default the
moving image's features are computed once and *warped* by the field at every iteration
(``recompute_features`` false); recomputing them from the warped grey-value image, as the paper
does, costs K + 1 network passes instead of two and is kept as an option. The network runs on a
3 mm working grid (``base.run_network``), so the field lives on a 6 mm feature grid.

Variants (``--variant``): ``suits`` (default, ``suits.pt``), ``replica`` (the network after MIND
pre-training, ``suits-replica.pt``) and ``mind`` (hand-crafted MIND-SSC features in the same
solver; needs no checkpoint).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserInputError
from ..losses import box_mean, mind_ssc
from ..spatial import resize_displacement, resize_image, spatial_gradient, warp
from .base import (MethodSpec, RegistrationInputs, checkpoint_folders, find_checkpoint,
                   load_network, register_method, run_network)

VARIANTS = ("suits", "replica", "mind")
FEATURE_CHANNELS = 12  # as MIND-SSC
# lambda at test, and half of it in training (the paper's ratio: 5 in training, 10 at test)
DEFAULT_CONFIG = {
    "iterations": 15,               # K, as in the paper
    "regularization": 1.0,          # lambda at test
    "training_regularization": 0.5,  # lambda in training
    "epsilon": 1e-4,                # eps I: positive definite where features are flat
    "cg_tolerance": 0.05,           # relative residual of every linear solve
    "cg_iterations": 40,            # at most, per solve
    "smoothing": 3,                 # box filter (voxels of the working grid) after upsampling
    "matrix_grad": False,           # gradient of the data-term matrix (off, as in the paper)
    "mind_fraction": 0.25,          # share of the training steps in phase "mind"
    "recompute_features": False,    # True: features of the warped image every iteration (paper)
}


# ------------------------------------------------------------------------------ feature network
def conv_norm_relu(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
                   dilation: int = 1) -> nn.Sequential:
    """Convolution (padding keeps the grid), instance normalisation, ReLU (Table 1, layers 1-4)."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel, stride, padding, dilation),
                         nn.InstanceNorm3d(out_channels), nn.ReLU())


class FeatureNetwork(nn.Module):
    """The Y-shaped feature CNN: ``features(image, "fixed" | "moving")`` -> ``(B, 12, d, h, w)``.

    Layers 1-2 are one stream per modality; layers 3-5 (``shared``) are one set of weights that
    both streams pass through, so the two modalities end in one representation. Input sides
    must be odd: the stride-2 layer then maps voxel ``j`` of the feature grid exactly onto voxel
    ``2j`` of the input, corners included (:class:`SUITS` pads to odd sides).
    """

    def __init__(self, channels: int = FEATURE_CHANNELS):
        super().__init__()
        self.streams = nn.ModuleDict({
            name: nn.Sequential(conv_norm_relu(1, 16, kernel=5, dilation=2),
                                conv_norm_relu(16, 32))
            for name in ("fixed", "moving")})
        self.shared = nn.Sequential(conv_norm_relu(32, 32, stride=2), conv_norm_relu(32, 32),
                                    nn.Conv3d(32, channels, 3, 1, 1), nn.Sigmoid())

    def features(self, image: torch.Tensor, stream: str) -> torch.Tensor:
        return self.shared(self.streams[stream](image))


def feature_shape(shape) -> Tuple[int, ...]:
    """The feature grid of an (odd-sided) input grid: every second voxel, corners kept."""
    return tuple((n - 1) // 2 + 1 for n in shape)


# ------------------------------------------------------------------------------------ the system
def graph_laplacian(field: torch.Tensor) -> torch.Tensor:
    """``L u`` for the 6-neighbour graph Laplacian of the grid: ``sum_{y ~ x} (u(x) - u(y))``
    over the neighbours each voxel has (3 to 6), i.e. ``u^T L u = sum_edges |u(x) - u(y)|^2``.
    Symmetric, positive semi-definite, zero exactly on constant fields."""
    out = torch.zeros_like(field)
    for dim in (2, 3, 4):
        n = field.shape[dim]
        if n < 2:
            continue
        difference = field.narrow(dim, 1, n - 1) - field.narrow(dim, 0, n - 1)  # u(x+e) - u(x)
        out.narrow(dim, 0, n - 1).sub_(difference)
        out.narrow(dim, 1, n - 1).add_(difference)
    return out


def neighbour_count(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(1, 1, D, H, W)``: the number of grid neighbours of every voxel (the Laplacian's
    diagonal)."""
    count = torch.zeros((1, 1, *shape), device=device, dtype=dtype)
    for axis, n in enumerate(shape):
        if n < 2:
            continue
        profile = torch.full((n,), 2.0, device=device, dtype=dtype)
        profile[0] = profile[-1] = 1.0
        view = [1, 1, 1, 1, 1]
        view[axis + 2] = n
        count = count + profile.view(view)
    return count


def data_blocks(gradients: torch.Tensor) -> torch.Tensor:
    """Per-voxel 3x3 data-term matrices ``sum_c grad R_c grad R_c^T`` ``(B, 3, 3, D, H, W)`` from
    the feature gradients ``(B, C, 3, D, H, W)``."""
    return torch.einsum("bcidhw,bcjdhw->bijdhw", gradients, gradients)


def block_columns(blocks: torch.Tensor):
    """The three columns ``(B, 3, D, H, W)`` of per-voxel 3x3 matrices, contiguous: applied column
    by column (:func:`block_apply`, three fused multiply-adds) instead of a broadcast product
    over all nine entries and its strided reduction."""
    return [blocks[:, :, column].contiguous() for column in range(3)]


def block_apply(columns, field: torch.Tensor) -> torch.Tensor:
    """Apply per-voxel 3x3 matrices (:func:`block_columns`) to a field ``(B, 3, D, H, W)``."""
    out = columns[0] * field[:, 0:1]
    out.addcmul_(columns[1], field[:, 1:2])
    return out.addcmul_(columns[2], field[:, 2:3])


def system_apply(columns, field: torch.Tensor, regularization: float,
                 epsilon: float) -> torch.Tensor:
    """``A v = M v + lambda L v + eps v`` without forming ``A``."""
    out = block_apply(columns, field).add_(graph_laplacian(field), alpha=regularization)
    return out.add_(field, alpha=epsilon)


def block_jacobi(blocks: torch.Tensor, regularization: float, epsilon: float) -> torch.Tensor:
    """The inverses of ``A``'s 3x3 diagonal blocks, ``M(x) + (lambda deg(x) + eps) I``."""
    shape = blocks.shape[3:]
    diagonal = regularization * neighbour_count(shape, blocks.device, blocks.dtype) + epsilon
    eye = torch.eye(3, device=blocks.device, dtype=blocks.dtype).view(1, 3, 3, 1, 1, 1)
    diagonal_blocks = blocks + eye * diagonal.unsqueeze(1)
    inverse = torch.linalg.inv(diagonal_blocks.permute(0, 3, 4, 5, 1, 2))
    return inverse.permute(0, 4, 5, 1, 2, 3)


def conjugate_gradients(apply: Callable[[torch.Tensor], torch.Tensor],
                        precondition: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                        tolerance: float, max_iterations: int) -> torch.Tensor:
    """Preconditioned conjugate gradients for a symmetric positive definite ``A``, every batch item
    its own system (own step sizes). Stops when every item's preconditioned residual norm
    ``sqrt(r^T P r)`` is below ``tolerance`` times its initial value, or after ``max_iterations``
    (``r^T P r`` is computed by CG anyway: no extra reduction per iteration)."""
    def dot(a, b):
        return (a * b).sum(dim=tuple(range(1, a.dim())), keepdim=True)
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = precondition(residual)
    rho = dot(residual, direction)
    target = tolerance ** 2 * rho
    if not bool((rho > 0).any()):
        return solution
    for _ in range(max_iterations):
        image = apply(direction)
        curvature = dot(direction, image)
        alpha = torch.where(curvature > 0, rho / curvature.clamp_min(1e-30),
                            torch.zeros_like(rho))
        solution.add_(alpha * direction)
        residual.sub_(alpha * image)
        preconditioned = precondition(residual)
        rho_next = dot(residual, preconditioned)
        if bool((rho_next <= target).all()):
            break
        beta = torch.where(rho > 0, rho_next / rho.clamp_min(1e-30), torch.zeros_like(rho))
        direction = preconditioned.add_(beta * direction)
        rho = rho_next
    return solution


def _solve_system(blocks: torch.Tensor, rhs: torch.Tensor, settings) -> torch.Tensor:
    regularization, epsilon, tolerance, max_iterations, _ = settings
    columns = block_columns(blocks)
    inverse = block_columns(block_jacobi(blocks, regularization, epsilon))
    # one thread: the CG's many small operations (a few 10^4 voxels) gain nothing from a second,
    # and on a shared machine every parallel region waits for its slowest thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return conjugate_gradients(lambda v: system_apply(columns, v, regularization, epsilon),
                                   lambda v: block_apply(inverse, v), rhs, tolerance,
                                   max_iterations)
    finally:
        torch.set_num_threads(threads)


class LinearSolve(torch.autograd.Function):
    """``z = A^-1 b`` with ``A = M + lambda L + eps I`` (``M`` block diagonal, 3x3 per voxel).

    Forward: preconditioned CG. Backward (implicit differentiation, never through the CG
    iterations): ``g_b = A^-1 g_z`` (``A`` symmetric); with ``matrix_grad`` the blocks receive
    ``-sym(g_b z^T)`` per voxel, otherwise no gradient.
    """

    @staticmethod
    def forward(ctx, blocks, rhs, regularization, epsilon, tolerance, max_iterations,
                matrix_grad):
        settings = (regularization, epsilon, tolerance, max_iterations, matrix_grad)
        solution = _solve_system(blocks, rhs, settings)
        ctx.save_for_backward(blocks, solution)
        ctx.settings = settings
        return solution

    @staticmethod
    def backward(ctx, grad_solution):
        blocks, solution = ctx.saved_tensors
        grad_rhs = _solve_system(blocks, grad_solution.contiguous(), ctx.settings)
        grad_blocks = None
        if ctx.settings[-1] and ctx.needs_input_grad[0]:
            outer = grad_rhs.unsqueeze(2) * solution.unsqueeze(1)   # g_b z^T per voxel
            grad_blocks = -0.5 * (outer + outer.transpose(1, 2))
        return grad_blocks, grad_rhs, None, None, None, None, None


def solve(blocks: torch.Tensor, rhs: torch.Tensor, regularization: float, epsilon: float = 1e-4,
          tolerance: float = 0.05, max_iterations: int = 40,
          matrix_grad: bool = False) -> torch.Tensor:
    """:class:`LinearSolve`; without ``matrix_grad`` the blocks are constants of the solve."""
    if not matrix_grad:
        blocks = blocks.detach()
    return LinearSolve.apply(blocks, rhs, float(regularization), float(epsilon), float(tolerance),
                             int(max_iterations), bool(matrix_grad))


def descent_step(fixed_features: torch.Tensor, moving_features: torch.Tensor,
                 field: torch.Tensor, regularization: float, epsilon: float = 1e-4,
                 tolerance: float = 0.05, max_iterations: int = 40,
                 matrix_grad: bool = False) -> torch.Tensor:
    """One regularised Gauss-Newton increment ``du`` (feature-grid voxels) for the field ``u``
    (``field``) given the fixed features and the features of the moving image warped by ``u``."""
    gradients = spatial_gradient(moving_features)            # (B, C, 3, D, H, W)
    difference = moving_features - fixed_features            # r_c
    rhs = -(difference.unsqueeze(2) * gradients).sum(1) - regularization * graph_laplacian(field)
    return solve(data_blocks(gradients), rhs, regularization, epsilon, tolerance, max_iterations,
                 matrix_grad)


def upsample_field(field: torch.Tensor, shape, smoothing: int = 3) -> torch.Tensor:
    """A feature-grid field on the working grid: trilinear, then a ``smoothing``^3 box filter
    (together close to a quadratic B-spline; the paper interpolates with B-splines)."""
    field = resize_displacement(field, shape)
    return box_mean(field, smoothing) if smoothing > 1 else field


# ---------------------------------------------------------------------------------- the method
MovingFeatures = Callable[[torch.Tensor], torch.Tensor]  # feature-grid field -> moving features


class SUITS(nn.Module):
    """``forward(fixed, moving)`` -> displacement ``(B, 3, D, H, W)`` in input-grid voxels.

    ``representation`` selects the features the solver sees: ``"network"`` (the learned ones) or
    ``"mind"`` (hand-crafted MIND-SSC of the working-grid image, resized to the feature grid).
    ``recompute_features`` true: every iteration computes the features of the moving image warped
    by the current field (the paper); false: the moving image's features are computed once and
    warped by the field (fast: two network passes per registration instead of K + 1).
    """

    def __init__(self, iterations: int = 15, regularization: float = 1.0,
                 training_regularization: float = 0.5, epsilon: float = 1e-4,
                 cg_tolerance: float = 0.05, cg_iterations: int = 40, smoothing: int = 3,
                 matrix_grad: bool = False, mind_fraction: float = 0.25,
                 recompute_features: bool = False, representation: str = "network"):
        super().__init__()
        self.features = FeatureNetwork()
        self.iterations = int(iterations)
        self.regularization = float(regularization)
        self.training_regularization = float(training_regularization)
        self.epsilon = float(epsilon)
        self.cg_tolerance = float(cg_tolerance)
        self.cg_iterations = int(cg_iterations)
        self.smoothing = int(smoothing)
        self.matrix_grad = bool(matrix_grad)
        self.mind_fraction = float(mind_fraction)
        self.recompute_features = bool(recompute_features)
        self.representation = representation

    def describe(self, image: torch.Tensor, stream: str, representation: str) -> torch.Tensor:
        """Features of a working-grid image on the feature grid."""
        if representation == "network":
            return self.features.features(image, stream)
        if representation == "mind":
            return resize_image(mind_ssc(image), feature_shape(image.shape[2:]))
        raise ValueError(f"unknown SUITS representation '{representation}'")

    def representations(self, fixed: torch.Tensor, moving: torch.Tensor,
                        representation: Optional[str] = None
                        ) -> Tuple[torch.Tensor, MovingFeatures]:
        """The fixed image's features, and the moving features as a function of the field."""
        kind = representation or self.representation
        fixed_features = self.describe(fixed, "fixed", kind)
        if self.recompute_features:
            shape = tuple(moving.shape[2:])
            return fixed_features, lambda field: self.describe(
                warp(moving, upsample_field(field, shape, self.smoothing)), "moving", kind)
        moving_features = self.describe(moving, "moving", kind)
        return fixed_features, lambda field: warp(moving_features, field)

    def step(self, fixed_features: torch.Tensor, moving_features: torch.Tensor,
             field: torch.Tensor, regularization: float) -> torch.Tensor:
        """One increment ``du`` of the regularised descent (:func:`descent_step`)."""
        return descent_step(fixed_features, moving_features, field, regularization,
                            self.epsilon, self.cg_tolerance, self.cg_iterations,
                            self.matrix_grad)

    def descend(self, fixed_features: torch.Tensor, moving_features: MovingFeatures,
                iterations: int, regularization: float, field: Optional[torch.Tensor] = None,
                report: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """``u <- u + du`` for ``iterations`` steps from ``field`` (zero by default)."""
        if field is None:
            field = fixed_features.new_zeros((fixed_features.shape[0], 3,
                                              *fixed_features.shape[2:]))
        for iteration in range(iterations):
            field = field + self.step(fixed_features, moving_features(field), field,
                                      regularization)
            if report is not None:
                report(iteration + 1)
        return field

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor,
                representation: Optional[str] = None, regularization: Optional[float] = None,
                report: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        shape = tuple(fixed.shape[2:])
        fixed, moving = pad_to_odd(fixed), pad_to_odd(moving)
        fixed_features, moving_features = self.representations(fixed, moving, representation)
        weight = self.regularization if regularization is None else float(regularization)
        field = self.descend(fixed_features, moving_features, self.iterations, weight,
                             report=report)
        return crop_to(upsample_field(field, fixed.shape[2:], self.smoothing), shape)


def pad_to_odd(image: torch.Tensor) -> torch.Tensor:
    """One replicated voxel at the end of every even side, so the feature grid's corners fall on
    the grid's corners (the field is cropped back afterwards)."""
    extra = [1 - n % 2 for n in image.shape[2:]]
    if not any(extra):
        return image
    return F.pad(image, [0, extra[2], 0, extra[1], 0, extra[0]], mode="replicate")


def crop_to(image: torch.Tensor, shape) -> torch.Tensor:
    return image[:, :, :shape[0], :shape[1], :shape[2]]


def build_network(config: Dict) -> SUITS:
    config = dict(DEFAULT_CONFIG, **(config or {}))
    return SUITS(config["iterations"], config["regularization"],
                 config["training_regularization"], config["epsilon"], config["cg_tolerance"],
                 config["cg_iterations"], config["smoothing"], config["matrix_grad"],
                 config["mind_fraction"], config["recompute_features"])


# -------------------------------------------------------------------------------------- training
def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``(B, 1, D, H, W)`` integer labels -> ``(B, classes, D, H, W)`` float one-hot maps."""
    return F.one_hot(labels[:, 0].long(), classes).permute(0, 4, 1, 2, 3).float()


def mind_targets(network: SUITS, fixed: torch.Tensor, moving: torch.Tensor):
    """Phase ``mind``: L1 between each stream's features and the MIND-SSC descriptors of its own
    image (computed on the working grid, resized to the feature grid), both streams."""
    fixed, moving = pad_to_odd(fixed), pad_to_odd(moving)
    total, terms = 0.0, {}
    for stream, image in (("fixed", fixed), ("moving", moving)):
        with torch.no_grad():
            target = network.describe(image, stream, "mind")
        value = (network.features.features(image, stream) - target).abs().mean()
        terms[f"mind_l1_{stream}"] = float(value.detach())
        total = total + value
    return total, terms


def draw_k_back(iterations: int, step: int) -> int:
    """``k_back`` in 1..K, drawn afresh for every training step (reproducible per step)."""
    generator = torch.Generator().manual_seed(1_000_003 * int(step) + 17)
    return int(torch.randint(1, iterations + 1, (1,), generator=generator))


def weakly_supervised(network: SUITS, fixed: torch.Tensor, moving: torch.Tensor,
                      fixed_labels: torch.Tensor, moving_labels: torch.Tensor, k_back: int):
    """Phase ``suits``: ``k_back - 1`` iterations driven by the one-hot label maps without
    gradients, then one tracked iteration from the features; the cross-entropy of the moving
    one-hot labels warped by the result against the fixed labels."""
    shape = tuple(fixed.shape[2:])
    fixed, moving = pad_to_odd(fixed), pad_to_odd(moving)
    classes = int(max(fixed_labels.max(), moving_labels.max())) + 1
    fixed_hot = pad_to_odd(one_hot(fixed_labels, classes))
    moving_hot = pad_to_odd(one_hot(moving_labels, classes))
    working, coarse = tuple(fixed.shape[2:]), feature_shape(fixed.shape[2:])
    weight = network.training_regularization
    with torch.no_grad():
        field = network.descend(
            resize_image(fixed_hot, coarse),
            lambda u: resize_image(warp(moving_hot, upsample_field(u, working, network.smoothing)),
                                   coarse), k_back - 1, weight)
    fixed_features, moving_features = network.representations(fixed, moving, "network")
    field = field + network.step(fixed_features, moving_features(field), field, weight)
    probabilities = warp(moving_hot, upsample_field(field, working, network.smoothing))
    cross_entropy = -crop_to(fixed_hot * torch.log(probabilities.clamp_min(1e-6)),
                             shape).sum(1).mean()
    return cross_entropy, {"cross_entropy": float(cross_entropy.detach()), "k_back": k_back}


def training_loss(network: SUITS, fixed: torch.Tensor, moving: torch.Tensor,
                  batch: Optional[Dict] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The trainer's ``loss_fn`` hook (training/train.py).

    The first ``mind_fraction`` of the steps are phase ``mind``, the rest phase ``suits``
    (``mind_fraction`` 1: the replica alone; 0: end to end only, e.g. resumed from the replica).
    Validation (``batch["training"]`` false) reports the phase the run ends in, with
    ``k_back = K`` in phase ``suits``.
    """
    batch = batch or {}
    step, total = int(batch.get("step", 0)), int(batch.get("iterations", 0) or 1)
    training = bool(batch.get("training", False))
    if network.mind_fraction >= 1.0 or (training and step < network.mind_fraction * total):
        return mind_targets(network, fixed, moving)
    k_back = draw_k_back(network.iterations, step) if training else network.iterations
    return weakly_supervised(network, fixed, moving, batch["fixed_labels"],
                             batch["moving_labels"], k_back)


# ------------------------------------------------------------------------------------ inference
REPLICA_CHECKPOINT = "suits-replica.pt"


def select_network(spec: MethodSpec, variant: str, device="cpu") -> SUITS:
    """The network of a variant: ``suits.pt``, ``suits-replica.pt``, or for ``mind`` an untrained
    one (its features are never used)."""
    if variant == "mind":
        return build_network(spec.config).to(device).eval()
    if variant == "replica":
        path = find_checkpoint(REPLICA_CHECKPOINT)
        if path is None:
            raise UserInputError(
                f"SUITS variant 'replica' needs {REPLICA_CHECKPOINT} (not found in "
                f"{', '.join(checkpoint_folders())}); train it with: python -m training train "
                "--method suits --config '{\"mind_fraction\": 1.0}' --output "
                f"Resources/checkpoints/{REPLICA_CHECKPOINT}")
        return load_network(spec, device, path)
    if variant == "suits":
        return load_network(spec, device)
    raise UserInputError(f"SUITS has no variant '{variant}'; choose from {', '.join(VARIANTS)}")


def run(inputs: RegistrationInputs, spec: MethodSpec) -> torch.Tensor:
    """The descent on the working grid (``base.run_network``) with the variant's features.

    ``inputs.options``: ``variant``; ``regularization`` (lambda, instead of the config's; the
    ``--regularization`` flag belongs to ``--refine``); ``iterations`` (K) and
    ``recompute_features`` override the config.
    """
    options = inputs.options
    variant = options.get("variant") or VARIANTS[0]
    network = select_network(spec, variant, inputs.fixed.device)
    iterations = int(options.get("iterations") or network.iterations)
    recompute = bool(options.get("recompute_features", network.recompute_features))
    representation = "mind" if variant == "mind" else "network"

    def register(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        saved = network.iterations, network.recompute_features
        network.iterations, network.recompute_features = iterations, recompute
        try:
            return network(fixed, moving, representation, options.get("regularization"),
                           report=lambda done: inputs.progress.report(
                               0.1 + 0.9 * done / iterations, f"suits ({variant})",
                               f"iteration {done}/{iterations}"))
        finally:
            network.iterations, network.recompute_features = saved

    return run_network(inputs, spec, register, label=f"suits ({variant})")


SPEC = register_method(MethodSpec(
    name="suits",
    title="SUITS (learned multi-modal features + regularised Gauss-Newton descent)",
    paper="Blendowski, Hansen, Heinrich, Weakly-supervised learning of multi-modal features for "
          "regularised iterative descent in 3D image registration, MedIA 2021",
    description="A Y-shaped CNN maps each modality to MIND-like features; 15 diffusion-"
                "regularised Gauss-Newton steps (one linear solve each) register them. Additive "
                "updates: not diffeomorphic. --variant mind uses hand-crafted MIND-SSC instead "
                "(no checkpoint needed).",
    run=run,
    build_network=build_network,
    config=dict(DEFAULT_CONFIG),
    checkpoint="suits.pt",
    working_spacing_mm=3.0,
    size_multiple=1,     # any side: the network pads to odd sides itself
    multimodal=True,
    # trainer schema (training/train.py): the loss_fn hook runs both phases; no coarse stage (the
    # features are learned at the grid they are used on); second-contrast pairs are the point.
    # lr 1e-4 for the combined run: at 1e-3 the end-to-end phase of a smoke run took the
    # validation Dice from 0.75 to 0.29 in 10 steps (docs/methods/suits/smoke); the ablation
    # script trains the replica at 1e-3 and end to end at 1e-4
    training={"loss_fn": training_loss, "lr": 1e-4, "batch_size": 2, "curriculum": None,
              # canvases a multiple of 16 like every network's (the recipes' windows assume it)
              "synth": {"contrast_probability": 0.5, "multiple": 16}},
    estimated_seconds={"2mm": 3.0, "1mm": 4.0},
    variants=VARIANTS,
))
