"""A montage of training pairs of a recipe (what the networks see), for training/README.md.

``python -m training.montage --recipe general --output docs/training/recipe-general.png``

Each column is one training pair at the recipe's working grid (whole canvas, not the training
window, so the framing is visible): the fixed image above, the moving image below, an axial
slice through the anatomy, with the source, whether the moving image is in a second contrast,
and the mean / largest ground-truth displacement inside the labels.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

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
                      "max_mm": float(magnitude.max())})
        k = int(inside.nonzero()[:, 0].float().median()) if inside.any() \
            else pair.fixed.shape[2] // 2
        for row, image in enumerate((pair.fixed, pair.moving)):
            axes[row, column].imshow(image[0, 0, k].numpy(), cmap="gray", origin="lower",
                                     vmin=0, vmax=1)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        label = pair.source + (" (2nd contrast)" if pair.multimodal else "")
        axes[0, column].set_title(f"{label}\n|u| {stats[-1]['mean_mm']:.1f} / "
                                  f"{stats[-1]['max_mm']:.1f} mm", fontsize=7)
    axes[0, 0].set_ylabel("fixed", fontsize=8)
    axes[1, 0].set_ylabel("moving", fontsize=8)
    figure.suptitle(f"recipe '{recipe.name}': training pairs at {recipe.spacing_mm:g} mm "
                    f"(seed {seed}); |u| = mean / largest true displacement in the labels",
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="general")
    parser.add_argument("--output", required=True)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for row in montage(args.recipe, args.output, args.pairs, args.seed):
        print(f"{row['source']:<14} mean {row['mean_mm']:.2f} mm, max {row['max_mm']:.2f} mm")


if __name__ == "__main__":
    main()
