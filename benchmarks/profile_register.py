"""Where a whole ``deepreg register`` process spends its time, stage by stage, at 2 mm and 1 mm.

    python benchmarks/profile_register.py                          # 2 mm and 1 mm, 3 runs each
    python benchmarks/profile_register.py --spacing 2 --repeats 3 --output-dir docs/benchmarks
    python benchmarks/profile_register.py --root /tmp/old-checkout --label before   # any tree

The case is the benchmark's first one (MNI152 2009a and a copy deformed with seed 7, written as
compressed NIfTI files, with grey/white-matter labels), registered by the command the Slicer
module runs, ``python -m DeepRegistrationLib register FIXED MOVING -o DIR --fixed-labels F
--moving-labels M`` (io, every output and the QA figure). Reported, as medians over the runs:

- the whole process (wall and CPU seconds, peak resident memory from ``wait4``);
- start-up: from launching a process that only imports what ``register`` imports before it
  reads anything (cli, images, methods, engine, outputs) to the end of those imports (its exit
  not counted), with the heaviest imports from ``python -X importtime``; matplotlib, imported
  when the figure is drawn, is counted there;
- read: ``images.load_image`` / ``load_labels`` on the same files, timed in this process;
- every stage the process itself records in ``summary.json`` (``timings_seconds``): resampling,
  the global stage, each pyramid level of io (preparation and its steps), the final integration,
  each output computed and each file written, the QA figure;
- what is left (argument parsing, folder checks and swap, summary, interpreter exit).

Then io's cost per step on each pyramid level, beside an estimate of its arithmetic and memory
traffic and of what this machine streams (measured in the same run), and a component breakdown
of one step on the finest level. The load average before and after is printed: on a machine busy
with other jobs every absolute figure is inflated.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from benchmark import run_process, tree_env  # noqa: E402

STARTUP_IMPORTS = ("import DeepRegistrationLib.cli, DeepRegistrationLib.images, "
                   "DeepRegistrationLib.methods, DeepRegistrationLib.engine, "
                   "DeepRegistrationLib.outputs")

# Estimated work of one io step per voxel of the level (float32), fused-kernel minimum: LNCC
# forward and back (three box sums of three channels each way plus the pointwise algebra),
# trilinear sampling of the moving image and its gradient, the control-to-level upsampling and
# its adjoint (3 channels), and the squarings on the control grid (1/8 of the voxels, 3
# channels, forward and back, about 5 of them). Bytes: what must cross memory at least once
# per step (the images, the 3-channel field and its gradient, the fixed-image statistics).
FLOPS_PER_VOXEL = {"local NCC": 130, "warp": 120, "upsample": 130, "squarings": 5 * 240 / 8}
BYTES_PER_VOXEL = {"local NCC": 28, "warp": 32, "upsample": 24, "squarings": 5 * 96 / 8}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write_case(spacing, folder):
    import SimpleITK as sitk
    from DeepRegistrationLib.sample_data import demo_pair
    names = ("fixed", "moving", "fixed_labels", "moving_labels")
    paths = {name: os.path.join(folder, f"{name}.nii.gz") for name in names}
    for name, image in zip(names, demo_pair(spacing, seed=7)):
        sitk.WriteImage(image, paths[name], useCompression=True)
    return paths


def startup_seconds(code, root):
    """From launching a process to the end of ``code`` in it (its exit, which the whole process
    pays once at its end, is not counted here)."""
    command = [sys.executable, "-c", f"{code}\nimport time\nprint(time.time())"]
    launched = time.time()
    done = subprocess.run(command, env=tree_env(root), cwd=root, capture_output=True, text=True,
                          check=True).stdout
    return float(done.split()[-1]) - launched


def import_breakdown(root):
    """Cumulative seconds of the heaviest top-level imports of the start-up process."""
    command = [sys.executable, "-X", "importtime", "-c", STARTUP_IMPORTS]
    text = subprocess.run(command, env=tree_env(root), cwd=root, capture_output=True,
                          text=True, check=True).stderr
    rows = []
    for line in text.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(3)) <= 3:  # top level and their direct imports
            rows.append((int(match.group(2)) / 1e6, len(match.group(3)) // 2, match.group(4)))
    return sorted(rows, reverse=True)[:8]


def read_seconds(paths, repeats):
    from DeepRegistrationLib.images import load_image, load_labels
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fixed, _ = load_image(paths["fixed"], "fixed image")
        moving, _ = load_image(paths["moving"], "moving image")
        load_labels(paths["fixed_labels"], fixed, "fixed labels")
        load_labels(paths["moving_labels"], moving, "moving labels")
        runs.append(time.perf_counter() - started)
    return median(runs)


def streaming_rate(voxels):
    """GB/s of an out-of-place float32 add over arrays of ``voxels`` (read 2, write 1); 16 M
    elements (64 MB each) is past the last-level cache."""
    import torch
    a, b, c = (torch.rand(voxels) for _ in range(3))
    torch.add(a, b, out=c)
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(5):
            torch.add(a, b, out=c)
        runs.append((time.perf_counter() - started) / 5)
    return 3 * 4 * voxels / median(runs) / 1e9


def component_breakdown(paths, repeats=5):
    """Forward + backward seconds of each part of one io step on the finest level."""
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F
    from DeepRegistrationLib.images import image_to_tensor
    from DeepRegistrationLib.losses import diffusion_loss
    from DeepRegistrationLib.methods import instance_optimisation as io
    from DeepRegistrationLib.methods.base import pyramid_shapes
    fixed = image_to_tensor(sitk.ReadImage(paths["fixed"], sitk.sitkFloat32))
    moving = image_to_tensor(sitk.ReadImage(paths["moving"], sitk.sitkFloat32))
    shapes = pyramid_shapes(fixed.shape[2:], len(io.DEFAULT_ITERATIONS), io.DEFAULT_MAX_VOXELS)
    shape = shapes[-1]
    fixed, moving = io._pyramid(fixed, shapes)[-1], io._pyramid(moving, shapes)[-1]
    control = tuple(max((n - 1) // io.CONTROL_SPACING + 1, 4) for n in shape)
    identity = io._normalised_identity(shape)
    control_identity = io._normalised_identity(control)
    scale = io._normalising_scale(control)
    loss_of = io._feature_loss("lncc", fixed)
    generator = torch.Generator().manual_seed(0)
    # a smooth velocity of about a control voxel, like the ones io reaches on MNI152 pairs
    # (3 squarings, the minimum, on every level of a 2 mm registration)
    coarse = torch.randn(1, 3, 4, 5, 4, generator=generator) * 0.5
    velocity = F.interpolate(coarse, size=control, mode="trilinear",
                             align_corners=True).requires_grad_(True)
    small = (torch.randn(1, 3, *control, generator=generator) * 0.01).requires_grad_(True)
    update = (torch.randn(1, 3, *shape, generator=generator) * 0.01).requires_grad_(True)
    warped = moving.clone().requires_grad_(True)

    def squarings():
        io._exponential(velocity, control_identity, scale).sum().backward()

    def upsample():
        F.interpolate(small, size=shape, mode="trilinear", align_corners=True).sum().backward()

    def warp():
        io._sample(moving, identity + update.permute(0, 2, 3, 4, 1)).sum().backward()

    def lncc():
        loss_of(fixed, warped).backward()

    def regulariser():
        diffusion_loss(velocity).backward()

    def whole_step():
        field = io._exponential(velocity, control_identity, scale)
        grid = identity + F.interpolate(field, size=shape, mode="trilinear",
                                        align_corners=True).permute(0, 2, 3, 4, 1)
        loss = loss_of(fixed, io._sample(moving, grid)) + diffusion_loss(velocity)
        loss.backward()

    result = {"shape": shape, "voxels": math.prod(shape),
              "squaring_count": io._squaring_steps(velocity.detach())}
    for name, function in (("squarings", squarings), ("upsample", upsample), ("warp", warp),
                           ("local NCC", lncc), ("regulariser", regulariser),
                           ("whole step", whole_step)):
        function()
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            runs.append(time.perf_counter() - started)
        result[name] = median(runs)
    return result


LEVEL = re.compile(r"optimise level (\d+)/(\d+) \((\d+)x(\d+)x(\d+)\) (\d+) steps")


def profile(spacing, args, root):
    out = {"spacing": spacing}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_case(spacing, folder)
        import SimpleITK as sitk
        out["size"] = sitk.ReadImage(paths["fixed"]).GetSize()
        interpreter = [startup_seconds("pass", root) for _ in range(args.repeats)]
        startup = [startup_seconds(STARTUP_IMPORTS, root) for _ in range(args.repeats)]
        out["interpreter"], out["startup"] = median(interpreter), median(startup)
        out["imports"] = import_breakdown(root)
        out["read"] = read_seconds(paths, args.repeats)
        runs = []
        for repeat in range(args.repeats):
            target = os.path.join(folder, f"out{repeat}")
            command = [sys.executable, "-m", "DeepRegistrationLib", "register", paths["fixed"],
                       paths["moving"], "-o", target, "--fixed-labels", paths["fixed_labels"],
                       "--moving-labels", paths["moving_labels"], "--quiet"]
            wall, peak, cpu = run_process(command, tree_env(root), root)
            with open(os.path.join(target, "summary.json")) as handle:
                summary = json.load(handle)
            runs.append({"wall": wall, "peak": peak, "cpu": cpu,
                         "register": summary["runtime_seconds"],
                         "timings": summary.get("timings_seconds", {}),
                         "dice": summary.get("mean_dice_after")})
            print(f"{spacing:g} mm run {repeat + 1}: {wall:.1f} s, {peak:.0f} MB, load "
                  f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        out["runs"] = runs
        if args.components:
            out["components"] = component_breakdown(paths)
        if args.pyinstrument:
            target = os.path.join(folder, "pyinstrument")
            text_path = os.path.join(args.output_dir or folder,
                                     f"profile-{args.label}-{spacing:g}mm-pyinstrument.txt")
            command = [sys.executable, "-m", "pyinstrument", "-o", text_path, "-m",
                       "DeepRegistrationLib", "register", paths["fixed"], paths["moving"], "-o",
                       target, "--fixed-labels", paths["fixed_labels"], "--moving-labels",
                       paths["moving_labels"], "--quiet"]
            subprocess.run(command, env=tree_env(root), cwd=root, check=True)
            out["pyinstrument"] = os.path.basename(text_path)
    out["stream_gbs"] = streaming_rate(16_000_000)
    return out


def report(result, label, load_before, load_after, started, threads):
    runs = result["runs"]
    wall = median([r["wall"] for r in runs])
    register = median([r["register"] for r in runs])
    names = []
    for run in runs:
        names += [n for n in run["timings"] if n not in names]
    stage = {n: median([r["timings"].get(n) for r in runs]) for n in names}
    lines = [f"## {result['spacing']:g} mm ({'x'.join(map(str, result['size']))} voxels), "
             f"{label}", ""]
    lines.append(f"{len(runs)} whole-process runs (medians), {os.cpu_count()} CPU cores, torch "
                 f"threads {threads}; {started:%Y-%m-%d %H:%M}; load average before "
                 f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after "
                 f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
                 + (" (other jobs running: absolute seconds inflated)."
                    if max(load_before[0], load_after[0]) > 0.5 else "."))
    lines.append("")
    lines.append(f"Whole process {wall:.2f} s wall, {median([r['cpu'] for r in runs]):.2f} s "
                 f"CPU, peak {median([r['peak'] for r in runs]):.0f} MB; runs: "
                 + ", ".join(f"{r['wall']:.2f} s" for r in runs)
                 + (f"; mean Dice after {median([r['dice'] for r in runs]):.4f}"
                    if runs[0]["dice"] is not None else ""))
    lines.append("")
    lines.append("| stage | seconds | share of the whole |")
    lines.append("|---|---|---|")

    def row(name, seconds, indent=0):
        share = f"{100 * seconds / wall:.1f}%" if seconds is not None else "-"
        value = f"{seconds:.3f}" if seconds is not None else "-"
        lines.append(f"| {'&nbsp;' * 4 * indent}{name} | {value} | {share} |")

    row("start-up: interpreter + imports (separate process, to the end of its imports)",
        result["startup"])
    row("of which the interpreter alone", result["interpreter"], 1)
    for seconds, depth, name in result["imports"]:
        row(f"import {name}", seconds, 1 + depth)
    row("read and check the 4 input files", result["read"])
    row("engine.register (summary.json runtime)", register)
    output_total = 0.0
    for name, seconds in stage.items():
        if seconds is None:
            continue
        is_output = name.startswith(("compute ", "write ", "draw "))
        if is_output:
            output_total += seconds
        if name in ("method", "prepare") or not is_output:
            row(name, seconds, 1)
    row("outputs (each computed and written) and the QA figure", output_total)
    for name, seconds in stage.items():
        if seconds is not None and name.startswith(("compute ", "write ", "draw ")):
            row(name, seconds, 1)
    known = (result["startup"] or 0) + (result["read"] or 0) + (register or 0) + output_total
    row("other (argument checks, summary, folder swap, exit)", wall - known)
    lines.append("")

    levels = []
    for name, seconds in stage.items():
        match = LEVEL.match(name)
        if match and seconds:
            shape = tuple(int(match.group(i)) for i in (3, 4, 5))
            steps = int(match.group(6))
            levels.append((int(match.group(1)), shape, steps, seconds))
    if levels:
        flops = sum(FLOPS_PER_VOXEL.values())
        bytes_ = sum(BYTES_PER_VOXEL.values())
        lines.append(f"io per step against its arithmetic: about {flops:.0f} flop and "
                     f"{bytes_:.0f} bytes of unavoidable memory traffic per voxel per step "
                     f"(forward and backward, fused-kernel minimum); this machine streamed "
                     f"{result['stream_gbs']:.1f} GB/s in this run (float32 add, 16 M elements).")
        lines.append("")
        lines.append("| level | grid | steps | ms per step | ns per voxel-step | GFLOP/s "
                     "achieved | traffic-bound ms per step |")
        lines.append("|---|---|---|---|---|---|---|")
        for level, shape, steps, seconds in levels:
            voxels = math.prod(shape)
            per_step = seconds / steps
            lines.append(f"| {level} | {'x'.join(map(str, shape))} | {steps} | "
                         f"{1000 * per_step:.1f} | {1e9 * per_step / voxels:.0f} | "
                         f"{flops * voxels / per_step / 1e9:.2f} | "
                         f"{1000 * bytes_ * voxels / (result['stream_gbs'] * 1e9):.2f} |")
        lines.append("")
    components = result.get("components")
    if components:
        voxels = components["voxels"]
        lines.append(f"One step on the finest level ({'x'.join(map(str, components['shape']))}, "
                     f"{components['squaring_count']} squarings), each part forward + backward "
                     "(median of 5, this process):")
        lines.append("")
        lines.append("| part | ms | ns per voxel | estimated flop per voxel |")
        lines.append("|---|---|---|---|")
        for name in ("squarings", "upsample", "warp", "local NCC", "regulariser", "whole step"):
            estimate = FLOPS_PER_VOXEL.get(name, sum(FLOPS_PER_VOXEL.values())
                                           if name == "whole step" else None)
            lines.append(f"| {name} | {1000 * components[name]:.1f} | "
                         f"{1e9 * components[name] / voxels:.0f} | "
                         f"{estimate:.0f} |" if estimate is not None else
                         f"| {name} | {1000 * components[name]:.1f} | "
                         f"{1e9 * components[name] / voxels:.0f} | - |")
        lines.append("")
    if result.get("pyinstrument"):
        lines.append(f"Call tree of one more run (pyinstrument, sampling): "
                     f"[{result['pyinstrument']}]({result['pyinstrument']})")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=ROOT, help="source tree whose deepreg is profiled")
    parser.add_argument("--label", default="current", help="name of the tree in the report")
    parser.add_argument("--components", action="store_true",
                        help="also time the parts of one io step (needs the current tree)")
    parser.add_argument("--pyinstrument", action="store_true",
                        help="also keep a pyinstrument call tree of one run")
    parser.add_argument("--output-dir", help="write profile-LABEL-Smm.md (and .json) here")
    args = parser.parse_args(argv)
    from DeepRegistrationLib.runtime import configure_openmp
    configure_openmp()
    import torch
    root = os.path.abspath(args.root)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    for spacing in args.spacing:
        started = datetime.datetime.now()
        load_before = os.getloadavg()
        result = profile(spacing, args, root)
        load_after = os.getloadavg()
        text = report(result, args.label, load_before, load_after, started,
                      torch.get_num_threads())
        print(text, flush=True)
        if args.output_dir:
            base = os.path.join(args.output_dir, f"profile-{args.label}-{spacing:g}mm")
            command = "python benchmarks/profile_register.py " + " ".join(
                argv if argv is not None else sys.argv[1:])
            with open(base + ".md", "w") as handle:
                handle.write(f"<!-- written by: {command} -->\n\n{text}\n")
            with open(base + ".json", "w") as handle:
                json.dump({"command": command, "root": root, "load_before": load_before,
                           "load_after": load_after, **result}, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
