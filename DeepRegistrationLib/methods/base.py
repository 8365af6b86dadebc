"""What every method shares: its spec, the registry, checkpoints with model cards, and the one
routine that runs a network on a working grid.

A method receives :class:`RegistrationInputs` -- the fixed image and the moving image already
resampled onto the fixed grid, both intensity-normalised ``(1, 1, D, H, W)`` tensors -- and returns
a displacement ``(1, 3, D, H, W)`` in voxels of the fixed grid (``warped(x) = moving(x + u(x))``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import UserInputError
from ..progress import ProgressScope
from ..spatial import (crop_to_region, pad_to_multiple, resize_displacement, resize_image,
                       warp)


@dataclass
class RegistrationInputs:
    fixed: torch.Tensor
    moving: torch.Tensor
    spacing: Tuple[float, float, float]  # fixed grid spacing in mm, (D, H, W) order
    similarity: str = "lncc"
    regularization: Optional[float] = None
    progress: ProgressScope = field(default_factory=ProgressScope)
    options: Dict = field(default_factory=dict)
    # the fixed image (SimpleITK; its geometry only): with it a network sees the pair in the
    # canonical orientation and framing (canonical.py); without it, on the fixed grid as stored
    geometry: Optional[Any] = None


@dataclass
class MethodSpec:
    """A registration method: how to run it and what a user should know about it."""
    name: str
    title: str
    paper: str
    description: str
    run: Callable[["RegistrationInputs", "MethodSpec"], torch.Tensor]
    build_network: Optional[Callable[[Dict], torch.nn.Module]] = None
    config: Dict = field(default_factory=dict)
    checkpoint: Optional[str] = None          # file name under a checkpoint folder
    working_spacing_mm: Optional[float] = None  # networks run on an isotropic working grid
    size_multiple: int = 16                    # network input sides must divide by this
    # What --similarity accepts (see similarity_choices). A method that optimises the similarity
    # itself when it registers (``optimises_similarity``: instance optimisation) lists its own.
    # A network optimises none (its loss was fixed in training): left None, its list is the
    # instance optimisation's (``instance_optimisation.SIMILARITIES``), as the similarity is the
    # one --refine optimises -- one list for every network, not one copy per registration.
    similarities: Optional[Tuple[str, ...]] = None
    optimises_similarity: bool = False
    # a network trained on pairs of different contrasts (SUITS); the others saw one contrast per
    # pair and can go far wrong on two (engine.contrast_caution)
    multimodal: bool = False
    default_similarity: str = "lncc"
    training: Dict = field(default_factory=dict)  # losses and weights the trainer uses
    estimated_seconds: Dict = field(default_factory=dict)
    variants: Tuple[str, ...] = ()             # accepted values of --variant (first = default)

    def __post_init__(self):
        if self.similarities is None:
            from .instance_optimisation import SIMILARITIES
            self.similarities = SIMILARITIES
        self.similarities = tuple(self.similarities)

    def similarity_choices(self, refine: bool, alignment: bool = True) -> Tuple[str, ...]:
        """The similarities that change a registration by this method, with or without
        ``--refine`` steps and a global stage (``alignment``: ``--initial`` other than none).

        ``--similarity`` drives the method itself when it optimises one, the instance
        optimisation of ``--refine``, and the global stage's measure (local NCC, or MIND for a
        multi-modal similarity: ``alignment.MEASURES``). So a network without ``--refine``
        accepts only those measures (and nothing but its default without a global stage):
        any other similarity would have no effect at all (``engine.check_similarity``)."""
        if self.optimises_similarity or refine:
            return self.similarities
        if not alignment:
            return (self.default_similarity,)
        from ..alignment import MEASURES
        return tuple(s for s in self.similarities
                     if s in MEASURES or s == self.default_similarity)

    @property
    def needs_checkpoint(self) -> bool:
        return self.build_network is not None

    def checkpoint_path(self) -> Optional[str]:
        return find_checkpoint(self.checkpoint) if self.checkpoint else None

    @property
    def available(self) -> bool:
        return not self.needs_checkpoint or self.checkpoint_path() is not None

    def describe(self) -> Dict:
        """The JSON-able description ``deepreg methods --json`` prints."""
        path = self.checkpoint_path()
        return {"name": self.name, "title": self.title, "paper": self.paper,
                "description": self.description, "checkpoint": path,
                "model_card": read_model_card(path) if path else None,
                "available": self.available, "estimated_seconds": self.estimated_seconds,
                "similarities": list(self.similarities), "variants": list(self.variants),
                "similarities_without_refine": list(self.similarity_choices(refine=False)),
                # and with --initial none too (no global stage whose measure it could choose)
                "similarities_without_refine_or_alignment":
                    list(self.similarity_choices(refine=False, alignment=False)),
                "default_similarity": self.default_similarity}


METHODS: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UserInputError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))} "
                             "(see 'deepreg methods')") from None


def list_methods() -> List[MethodSpec]:
    return [METHODS[name] for name in sorted(METHODS)]


# -------------------------------------------------------------------------------- checkpoints
def checkpoint_folders() -> List[str]:
    """Where checkpoints are looked for: ``$DEEPREG_CHECKPOINTS`` (os.pathsep-separated), then the
    ``Resources/checkpoints`` folder beside the library (source tree and Slicer install)."""
    folders = [p for p in os.environ.get("DEEPREG_CHECKPOINTS", "").split(os.pathsep) if p]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folders.append(os.path.join(here, "Resources", "checkpoints"))
    return folders


def find_checkpoint(filename: str) -> Optional[str]:
    for folder in checkpoint_folders():
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card_path(checkpoint_path: str) -> str:
    return os.path.splitext(checkpoint_path)[0] + ".json"


def read_model_card(checkpoint_path: str) -> Optional[Dict]:
    path = model_card_path(checkpoint_path)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def save_checkpoint(path: str, network: torch.nn.Module, method: str, config: Dict,
                    card: Dict) -> Dict:
    """Write ``network``'s weights with method and config, and the model card beside it as JSON.

    The card gains the checkpoint's sha256 and size, so a card always matches its weights.
    """
    from .. import __version__
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"method": method, "config": config, "state_dict": network.state_dict(),
                "library_version": __version__,
                "working_spacing_mm": card.get("working_spacing_mm")}, path)
    card = dict(card, method=method, config=config, library_version=__version__,
                checkpoint=os.path.basename(path), sha256=sha256_of(path),
                size_bytes=os.path.getsize(path))
    with open(model_card_path(path), "w") as handle:
        json.dump(card, handle, indent=2, sort_keys=True)
    return card


def read_checkpoint(path: str) -> Dict:
    """The dict a checkpoint (or a training resume state) holds, unpickled as weights only.

    A ``.pt`` file is a pickle: torch's full unpickler runs whatever callable the file names, and
    checkpoints come from anywhere ``$DEEPREG_CHECKPOINTS`` or ``--resume`` points. The sha256 of
    the model card does not help (whoever supplies the file supplies its card). torch's
    weights-only unpickler accepts tensors, numbers, strings and containers and refuses anything
    else before calling it, which every file ``save_checkpoint`` and the trainer write satisfies.
    """
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        boilerplate = ("Weights only load failed", "Please file an issue",
                       "Check the documentation")
        lines = [line.strip() for line in str(error).splitlines()
                 if line.strip() and not line.strip().startswith(boilerplate)]
        named = [line for line in lines if "GLOBAL" in line]
        if named:  # a class or function the file wants called: refused before it could run
            raise UserInputError(f"checkpoint '{path}' holds Python code, not only weights, and "
                                 f"was refused without running it ({named[0]}); use a checkpoint "
                                 "from a source you trust, saved by 'python -m training train'") \
                from None
        raise UserInputError(f"cannot read checkpoint '{path}': not a PyTorch weights file "
                             f"({lines[0] if lines else 'unpickling failed'})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        text = str(error).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
        raise UserInputError(f"cannot read checkpoint '{path}': {first}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserInputError(f"'{path}' is not a DeepRegistration checkpoint (no state_dict)")
    return state


_NETWORK_CACHE: Dict[Tuple[str, str], torch.nn.Module] = {}


def load_network(spec: MethodSpec, device="cpu", path: Optional[str] = None) -> torch.nn.Module:
    """The method's network with its shipped (or given) weights, checked against its model card."""
    path = path or spec.checkpoint_path()
    if path is None:
        raise UserInputError(
            f"method '{spec.name}' has no trained checkpoint ({spec.checkpoint} was not found in "
            f"{', '.join(checkpoint_folders())}); train one with 'python -m training train "
            f"--method {spec.name}' or set DEEPREG_CHECKPOINTS")
    key = (path, str(device))
    if key in _NETWORK_CACHE:
        return _NETWORK_CACHE[key]
    card = read_model_card(path)
    if card is not None and card.get("sha256") and card["sha256"] != sha256_of(path):
        raise UserInputError(f"checkpoint '{path}' does not match its model card (sha256 differs); "
                             "the file is damaged or was replaced")
    state = read_checkpoint(path)
    if state.get("method") != spec.name:
        raise UserInputError(f"checkpoint '{path}' was trained for method '{state.get('method')}', "
                             f"not '{spec.name}'")
    network = spec.build_network(state["config"])
    try:
        network.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserInputError(f"checkpoint '{path}' does not fit method '{spec.name}' with config "
                             f"{state['config']}: {first}") from None
    # the grid the network was trained on (the general recipe ends at 2 mm; the first
    # checkpoints at the spec's 4 mm): the checkpoint's own, else its card's, else the spec's
    spacing = state.get("working_spacing_mm") or (card or {}).get("working_spacing_mm")
    network.working_spacing_mm = float(spacing) if spacing else spec.working_spacing_mm
    network.to(device).eval()
    _NETWORK_CACHE[key] = network
    return network


def network_spacing(network, spec: MethodSpec) -> Optional[float]:
    """The working grid of a loaded network (:func:`load_network`), else the spec's."""
    return getattr(network, "working_spacing_mm", None) or spec.working_spacing_mm


# --------------------------------------------------------------------------- networks on a grid
def working_shape(shape, spacing, working_spacing_mm: float):
    """Grid covering the same extent (corner voxel centres kept) at about ``working_spacing_mm``."""
    return tuple(max(int(round((n - 1) * s / working_spacing_mm)) + 1, 2)
                 for n, s in zip(shape, spacing))


def forward_padded(function, fixed: torch.Tensor, moving: torch.Tensor,
                   multiple: int) -> torch.Tensor:
    """``function(fixed, moving)`` on the pair padded on both sides (replicate) to a multiple of
    ``multiple`` -- centred, as the training canvas -- and cropped back to the pair's grid."""
    fixed, region = pad_to_multiple(fixed, multiple)
    moving, _ = pad_to_multiple(moving, multiple)
    return crop_to_region(function(fixed, moving), region)


def run_network(inputs: RegistrationInputs, spec: MethodSpec, network=None,
                label: Optional[str] = None) -> torch.Tensor:
    """Forward the method's network on the working grid and bring the field back to the fixed grid.

    With ``inputs.geometry`` (the engine always gives it) the pair is resampled onto the
    canonical canvas (``canonical.canonical_frame``: ``DICOMOrient`` "LPS" orientation,
    the network's working grid (:func:`network_spacing`), the union of the foregrounds plus a
    margin, sides a multiple of
    ``size_multiple``), the network returns a displacement in canvas voxels, and
    ``CanonicalFrame.field_to_fixed`` maps it back exactly to the fixed grid. Without it the pair
    is resized on its own grid (corners aligned), padded by :func:`forward_padded`, and the field
    resized back. ``network`` (a module or any ``f(fixed, moving)``) defaults to the spec's
    loaded checkpoint; ``label`` names it in the progress messages.
    """
    if network is None:
        network = load_network(spec, inputs.fixed.device)
    label = label or spec.name
    shape = tuple(inputs.fixed.shape[2:])
    if inputs.geometry is not None:
        from ..canonical import canonical_frame
        frame = canonical_frame(inputs.fixed, inputs.moving, inputs.geometry,
                                network_spacing(network, spec), spec.size_multiple)
        inputs.progress.report(0.1, f"{label}: network on a canonical "
                                    f"{'x'.join(map(str, frame.shape))} canvas")
        with torch.inference_mode():
            displacement = forward_padded(network, frame.to_canvas(inputs.fixed),
                                          frame.to_canvas(inputs.moving), spec.size_multiple)
        inputs.progress.report(1.0, f"{spec.name}: network done")
        return frame.field_to_fixed(displacement.clone())
    spacing = network_spacing(network, spec)
    work = working_shape(shape, inputs.spacing, spacing) if spacing else shape
    inputs.progress.report(0.1, f"{label}: network on a {'x'.join(map(str, work))} grid")
    with torch.inference_mode():
        displacement = forward_padded(network, resize_image(inputs.fixed, work),
                                      resize_image(inputs.moving, work), spec.size_multiple)
    inputs.progress.report(1.0, f"{spec.name}: network done")
    return resize_displacement(displacement.clone(), shape)


def pyramid_shapes(shape, levels: int, max_voxels: Optional[int] = None):
    """Grid shapes from coarse to fine, halving per level; the finest capped at ``max_voxels``."""
    finest = tuple(shape)
    total = math.prod(finest)
    if max_voxels and total > max_voxels:
        factor = (total / max_voxels) ** (1.0 / 3.0)
        finest = tuple(max(int(round((n - 1) / factor)) + 1, 2) for n in finest)
    return [tuple(max(int(round((n - 1) / 2 ** level)) + 1, 4) for n in finest)
            for level in reversed(range(levels))]


def scored_pair(fixed: torch.Tensor, moving: torch.Tensor,
                batch: Optional[Dict]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The images a training loss scores a field on, given the pair the network saw (``moving``
    already in the fixed contrast, :func:`same_contrast`).

    Normally that pair itself, the same tensors (callers test ``is`` to skip rescoring). When the
    trainer marks the batch
    ``clean`` (a recipe's ``clean_similarity``), the synthetic pair *before* each image's own
    acquisition effects (gamma, bias, noise, blur, thick slices, cut slabs): the network still
    sees the degraded images, but the similarity is scored where its minimum is the true
    alignment. Measured on the general recipe's pairs: with the degraded images LNCC at the true
    field is 0.36-0.79 (identity 0.46-0.85), with the clean ones 0.04-0.08, so a network trained
    on the degraded similarity learns to explain the degradations by deformation."""
    batch = batch or {}
    if not batch.get("clean") or batch.get("fixed_clean") is None:
        return fixed, moving
    fixed = batch["fixed_clean"].to(fixed)
    return fixed, same_contrast(fixed, batch["moving_clean"].to(moving), batch)


def report_field(batch: Optional[Dict], displacement: torch.Tensor) -> torch.Tensor:
    """Hand a training loss's final field to the trainer (``batch["outputs"]``), which adds the
    recipe's guidance terms to it (training/train.py); returns the field."""
    outputs = (batch or {}).get("outputs")
    if outputs is not None:
        outputs["displacement"] = displacement
    return displacement


def same_contrast(fixed: torch.Tensor, moving: torch.Tensor,
                  batch: Optional[Dict]) -> torch.Tensor:
    """The moving image a same-contrast similarity (VTN's 1 - CorrCoef, R2Net's MSE) can be
    trained on: for synthetic pairs whose moving image is in a second contrast
    (``batch["multimodal"]``), the same geometry in the fixed image's contrast,
    ``warp(fixed, batch["generating"])``; otherwise ``moving`` itself."""
    flags = (batch or {}).get("multimodal")
    generating = (batch or {}).get("generating")
    if not flags or generating is None or not any(flags):
        return moving
    swap = torch.tensor([bool(f) for f in flags], device=moving.device).view(-1, 1, 1, 1, 1)
    return torch.where(swap, warp(fixed, generating.to(fixed)), moving)
