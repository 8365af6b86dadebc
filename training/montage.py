"""A montage of training pairs of a recipe (what the networks see), for training/README.md.

``python -m training.montage --recipe general --output docs/training/recipe-general.png``

Each column is one training pair at the recipe's working grid (whole canvas, not the training
window, so the framing is visible): the fixed image above, the moving image below, an axial
slice through the anatomy, with the source, whether the moving image is in a second contrast,
and the mean / largest ground-truth displacement inside the labels, in all and without the
residual affine (the deformable part).

``python -m training.montage --recipe general --statistics 48`` draws 48 training pairs of the
recipe instead and prints the distribution of their deformable part: per pair the mean and the
largest length inside the labels (what the recipe's deformation strengths are calibrated on).
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from .data import available_sources
from .recipes import get_recipe
from .synth import PairGenerator, SynthConfig
from .train import _tuples


def montage(recipe_name: str, output: str, pairs: int = 8, seed: int = 0,
            contrast_probability: float = 0.0) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipe = get_recipe(recipe_name)
    installed = available_sources()
    sources = [s for s in recipe.sources if s in installed]
    config = replace(SynthConfig(spacing_mm=recipe.spacing_mm, **_tuples(recipe.synth)),
                     contrast_probability=contrast_probability, crop_shape=None)
    generator = PairGenerator(sources, config, seed=seed)
    figure, axes = plt.subplots(2, pairs, figsize=(1.9 * pairs, 4.3))
    stats = []
    for column in range(pairs):
        pair = generator.pair(column)
        inside = pair.fixed_labels[0, 0] > 0
        magnitude = pair.displacement[0].norm(dim=0)[inside] * recipe.spacing_mm
        stats.append({"source": pair.source, "mean_mm": float(magnitude.mean()),
                      "max_mm": float(magnitude.max()),
                      "deformable_mean_mm": pair.info["deformable_mean_mm"],
                      "deformable_max_mm": pair.info["deformable_max_mm"]})
        k = int(inside.nonzero()[:, 0].float().median()) if inside.any() \
            else pair.fixed.shape[2] // 2
        for row, image in enumerate((pair.fixed, pair.moving)):
            axes[row, column].imshow(image[0, 0, k].numpy(), cmap="gray", origin="lower",
                                     vmin=0, vmax=1)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        label = pair.source + (" (2nd contrast)" if pair.multimodal else "")
        axes[0, column].set_title(f"{label}\n|u| {stats[-1]['mean_mm']:.1f} / "
                                  f"{stats[-1]['max_mm']:.1f} mm\ndeformable "
                                  f"{stats[-1]['deformable_mean_mm']:.1f} / "
                                  f"{stats[-1]['deformable_max_mm']:.1f} mm", fontsize=7)
    axes[0, 0].set_ylabel("fixed", fontsize=8)
    axes[1, 0].set_ylabel("moving", fontsize=8)
    figure.suptitle(f"recipe '{recipe.name}': training pairs at {recipe.spacing_mm:g} mm "
                    f"(seed {seed}); |u| = mean / largest true displacement in the labels; "
                    f"deformable = the same without the residual affine",
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return stats


def deformation_statistics(recipe_name: str, pairs: int, seed: int = 0) -> str:
    """Quantiles over ``pairs`` training pairs (the training stream, the recipe's last grid and
    windows) of each pair's mean and largest deformable displacement inside the labels."""
    recipe = get_recipe(recipe_name)
    installed = available_sources()
    sources = [s for s in recipe.sources if s in installed]
    config = SynthConfig(spacing_mm=recipe.spacing_mm, **_tuples(recipe.synth),
                         crop_shape=recipe.crop)
    generator = PairGenerator(sources, config, seed=seed)
    means, largest = [], []
    for index in range(pairs):
        info = generator.pair(index).info
        means.append(info["deformable_mean_mm"])
        largest.append(info["deformable_max_mm"])
    lines = [f"recipe '{recipe.name}': deformable part of {pairs} training pairs (seed {seed}, "
             f"{recipe.spacing_mm:g} mm, windows {recipe.crop}, sources {', '.join(sources)}), "
             f"lengths inside the labels in mm",
             "| per pair | p10 | median | p90 | largest |", "|---|---|---|---|---|"]
    for name, values in (("mean", means), ("largest", largest)):
        q = np.percentile(values, [10, 50, 90])
        lines.append(f"| {name} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | {max(values):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="general")
    parser.add_argument("--output", help="the montage's PNG (required without --statistics)")
    parser.add_argument("--statistics", type=int, metavar="N",
                        help="print the deformable part's statistics over N training pairs")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.statistics:
        print(deformation_statistics(args.recipe, args.statistics, args.seed))
        return
    if not args.output:
        parser.error("--output is required (or --statistics N)")
    for row in montage(args.recipe, args.output, args.pairs, args.seed):
        print(f"{row['source']:<14} mean {row['mean_mm']:.2f} mm, max {row['max_mm']:.2f} mm; "
              f"deformable mean {row['deformable_mean_mm']:.2f} mm, "
              f"max {row['deformable_max_mm']:.2f} mm")


if __name__ == "__main__":
    main()
