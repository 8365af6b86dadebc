"""An image registered to itself must come back as the identity: the mean and largest
displacement (mm, inside the head) each method returns for every installed source registered to
itself, through ``engine.register`` with the global stage off. A network that returns millimetres
here invents deformation where there is none (a bias it learned from its training pairs).

    DEEPREG_CHECKPOINTS=runs/x python benchmarks/self_registration.py --methods vtn,vm-diff,io \
        [--output docs/evaluation/self-registration.md]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from DeepRegistrationLib.engine import register  # noqa: E402
from DeepRegistrationLib.images import resample_to_reference  # noqa: E402
from DeepRegistrationLib.outputs import displacement_to_physical  # noqa: E402
from DeepRegistrationLib.sample_data import resample_isotropic  # noqa: E402
from training.data import available_sources, load_source  # noqa: E402


def self_registration(method: str, image: sitk.Image, labels: sitk.Image):
    result = register(image, image, method=method, initial="none")
    vectors = displacement_to_physical(result.displacement, image)  # (k, j, i, 3) mm
    lengths = np.linalg.norm(vectors, axis=-1)[sitk.GetArrayFromImage(labels) > 0]
    return float(lengths.mean()), float(lengths.max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="io")
    parser.add_argument("--sources", default=None, help="default: every installed source")
    parser.add_argument("--spacing", type=float, default=2.0, help="resample sources to this")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    sources = args.sources.split(",") if args.sources else available_sources()
    lines = [f"<!-- written by: python benchmarks/self_registration.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])} -->", "",
             f"Each source at {args.spacing:g} mm registered to itself (global stage off); "
             "displacement length inside the labels, mm. Checkpoints from "
             f"`{os.environ.get('DEEPREG_CHECKPOINTS') or 'Resources/checkpoints'}`.", "",
             "| method | " + " | ".join(f"{s} mean / max" for s in sources) + " |",
             "|---|" + "---|" * len(sources)]
    for method in args.methods.split(","):
        cells = []
        for name in sources:
            volume = load_source(name)
            image = resample_isotropic(sitk.Cast(volume.image, sitk.sitkFloat32), args.spacing)
            labels = resample_to_reference(volume.labels, image, nearest=True)
            mean, largest = self_registration(method, image, labels)
            cells.append(f"{mean:.2f} / {largest:.2f}")
            print(f"{method} {name}: mean {mean:.2f} mm, max {largest:.2f} mm", flush=True)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
