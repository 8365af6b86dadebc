"""Training recipes: what data a network sees and on which grids, named so a model card can say.

``general`` is the recipe the shipped networks are trained with. It exists because the first
checkpoints, trained on deformations of the MNI152 template alone at 4 mm, did nothing useful on
anatomy they had not seen (issue #15): they learned one image's look, one framing and one family
of deformations. The recipe widens every one of those, within what two CPU cores can train:

- **anatomy**: every installed source but the one held out for the unseen-anatomy evaluation
  (``itk-t1``, a real single-subject brain), each turned into a new "subject" per pair by its own
  strong random diffeomorphism, and in 30% of the pairs repainted in a random label-driven
  contrast (SynthMorph-like; both images in the same contrast, so same-contrast losses apply);
- **orientation**: sources in the canonical (DICOMOrient "LPS") axis order the engine feeds
  networks; **framing**: anatomy up to 20 mm off-centre, slabs cut off one image (partial
  coverage), and at 2 mm random windows around the anatomy rather than the whole canvas;
- **resolution and sharpness**: thick-slice simulation on one axis (2-5x), unsharp masking or
  blur, gamma, bias and noise as real scanners differ;
- **pose**: a residual affine (rotation up to 5 degrees, shifts up to 6 mm per axis (10 mm in all), 5% scaling, 3% shear)
  -- what is left after the engine's global stage;
- **deformations**: four scales from 64 mm to 12 mm control spacing, each with its own random
  strength: per pair a mean displacement inside the anatomy of 1.1-6.4 mm (10th-90th
  percentile, median 2.4 mm) and a largest displacement of up to 15 mm (90th percentile), the
  inter-subject range (measured without the affine part: ``python -m training.montage
  --statistics 40``, docs/training/recipe-general-deformations.md). The first version (``general-v1``,
  which trained the vtn and vm-diff checkpoints of 2026-12-02) named the same scales but, since a
  scale's strength is its *largest* velocity component and each is multiplied by two uniform
  draws, its deformable part was a mean of 0.4 mm (median pair; largest displacement 2.5 mm at
  the 90th percentile): the networks learned the residual affine and almost no deformation;
- **grids**: a curriculum 8 mm (large batches) -> 4 mm windows of 192 mm -> 2 mm windows of
  128-160 mm (a window costs a fraction of the whole canvas), so the finest level can
  express 2 mm deformations (the 4 mm grid of the first checkpoints could not: a 2 mm displacement
  is half a voxel there).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from DeepRegistrationLib.errors import UserInputError


@dataclass
class Recipe:
    name: str
    sources: Tuple[str, ...]                  # trained on (those installed)
    unseen: Tuple[str, ...]                   # validated on, never trained on
    synth: Dict                               # SynthConfig overrides
    spacing_mm: float                         # the last stage's grid (the network's working grid)
    crop: Optional[Tuple[int, int, int]]      # the last stage trains on windows of this shape
    stages: List[Dict] = field(default_factory=list)  # coarse stages before it
    batch_size: int = 2                       # last stage's batch for a batch-4 method
    # terms added to every method's own loss on its final field (training.train.GUIDANCE)
    guidance: Dict[str, float] = field(default_factory=dict)
    # the methods' similarity scores each pair before its per-image acquisition effects, while
    # the network sees the degraded images (DeepRegistrationLib.methods.base.scored_pair)
    clean_similarity: bool = False

    def for_method(self, reference_batch: int) -> Dict:
        """Stage batch sizes scaled by the method's own default batch (4 = as written): VTN trains
        each pair both ways (batch 2), MS-R2Net is heavier (batch 1)."""
        factor = max(reference_batch, 1) / 4.0
        stages = [dict(s, batch_size=max(int(round(s["batch_size"] * factor)), 1))
                  for s in self.stages]
        return {"stages": stages, "batch_size": max(int(round(self.batch_size * factor)), 1)}

    def describe(self) -> Dict:
        return {"name": self.name, "sources": list(self.sources), "unseen": list(self.unseen),
                "synth": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in self.synth.items()},
                "spacing_mm": self.spacing_mm, "crop": list(self.crop) if self.crop else None,
                "stages": self.stages, "batch_size": self.batch_size,
                "guidance": dict(self.guidance), "clean_similarity": self.clean_similarity}


GENERAL_V1 = Recipe(
    name="general-v1",
    sources=("mni152", "pydeface", "invesalius-ct"),
    unseen=("itk-t1",),
    synth={
        "canonical": True,
        "independent_scales": True,
        "velocity_scales": ((64.0, 6.0), (32.0, 4.0), (16.0, 2.5), (12.0, 1.5)),
        "magnitude_range": (0.1, 1.0),
        "subject_scales": ((48.0, 6.0), (24.0, 3.0), (12.0, 2.0)),
        "subject_magnitude_range": (0.3, 1.0),
        "rotation_degrees": 5.0, "translation_mm": 6.0, "scaling": 0.05, "shear": 0.03,
        "affine_probability": 0.8,
        "gamma_std": 0.3, "bias_amplitude": 0.35, "blur_max_voxels": 1.0, "noise_max": 0.04,
        "synthesis_probability": 0.3,
        "framing_shift_mm": 20.0,
        "partial_coverage_probability": 0.2, "partial_coverage_max": 0.2,
        "thick_slice_probability": 0.2, "thick_slice_factor": (2.0, 5.0),
        "sharpen_probability": 0.3, "sharpen_max": 1.0,
        "crop_margin": 8,
    },
    spacing_mm=2.0,
    crop=(64, 80, 64),
    stages=[{"spacing_mm": 8.0, "fraction": 0.5, "batch_size": 8},
            {"spacing_mm": 4.0, "fraction": 0.3, "batch_size": 4, "crop": (48, 48, 48)}],
    batch_size=2,
    guidance={"supervised": 0.5},
    clean_similarity=True,
)

# the same recipe with deformations of the inter-subject range (see the module's docstring):
# the strengths were set from the deformable part's statistics, never from evaluation cases
GENERAL = replace(
    GENERAL_V1, name="general",
    synth=dict(GENERAL_V1.synth,
               velocity_scales=((64.0, 32.0), (32.0, 24.0), (16.0, 10.0), (12.0, 5.0)),
               magnitude_range=(0.2, 1.0)))

# ``general`` with a fourth real head, Colin 27 (a single subject; training/data.py): on anatomy
# they were trained on the networks recover 53-61 % of io's Dice gain on the headline's
# deformations, on the unseen head 27-37 % (docs/evaluation/seen-mni152-bspline), so more real
# anatomy is the first thing to add. Only the sources change, so a run on it against one on
# ``general`` measures what one more head is worth.
GENERAL_COLIN27 = replace(GENERAL, name="general-colin27",
                          sources=GENERAL.sources + ("colin27",))

RECIPES = {"general": GENERAL, "general-v1": GENERAL_V1, "general-colin27": GENERAL_COLIN27}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UserInputError(f"unknown recipe '{name}'; choose from {', '.join(RECIPES)}") \
            from None
