"""Registration methods beside ANTs SyN on synthetically deformed real brains: accuracy, seconds
and peak memory, each tool in a fresh process.

    python benchmarks/benchmark.py                    # 2 mm, 3 cases, io and ANTs SyN
    python benchmarks/benchmark.py --spacing 1 --cases 1 --peers ""      # io's 1 mm target
    python benchmarks/benchmark.py --methods vtn,r2net-svf,r2net-nsvf,ms-r2net,vm-diff
    python benchmarks/benchmark.py --spacing 1 --cases 1 --methods ms-r2net --peers ""

Cases: the MNI152 2009a template (nilearn) and copies deformed by random diffeomorphisms of
different seeds, with a mild intensity change and noise (``sample_data.demo_pair``); labels are
the template's grey and white matter. Every tool runs in a fresh process (so its peak resident
memory, VmHWM, is its own), returns its final transform as a displacement field on the fixed
grid, and every metric is computed here by the same library code: Dice of the moving labels
warped by that field (nearest neighbour), % of voxels with det J <= 0, SDlogJ.
Prints a markdown table; the README quotes it.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from DeepRegistrationLib.runtime import configure_openmp  # noqa: E402

configure_openmp()  # as the deepreg command does, before torch loads


def _peak_memory_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _run_tool(tool: str, spacing: float, seed: int, output: str, queue) -> None:
    """In a fresh process: build the pair, register it with ``tool``, save the field."""
    import torch
    from DeepRegistrationLib.sample_data import demo_pair
    fixed, moving, _, _ = demo_pair(spacing, seed=seed)
    from DeepRegistrationLib.methods import METHODS
    if tool in METHODS:
        from DeepRegistrationLib.engine import register
        started = time.perf_counter()  # the whole engine: resampling, network or optimisation
        displacement = register(fixed, moving, tool).displacement
        seconds = time.perf_counter() - started
    else:
        from training.peers import run_peer
        displacement, seconds = run_peer(tool, fixed, moving)
    torch.save(displacement, output)
    queue.put((seconds, _peak_memory_mb()))


def run_in_fresh_process(tool, spacing, seed, folder):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    path = os.path.join(folder, f"{tool}_{seed}.pt")
    process = context.Process(target=_run_tool, args=(tool, spacing, seed, path, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{tool} failed on case {seed} (exit code {process.exitcode})")
    seconds, peak = queue.get()
    import torch
    return torch.load(path), seconds, peak


def evaluate(displacement, fixed, fixed_labels, moving_labels):
    import SimpleITK as sitk
    from DeepRegistrationLib.metrics import dice, folding_percent, jacobian_determinant_map, sdlogj
    from DeepRegistrationLib.outputs import warp_image
    warped = sitk.GetArrayFromImage(warp_image(moving_labels, displacement, fixed, nearest=True))
    scores = dice(sitk.GetArrayFromImage(fixed_labels), warped, labels=[1, 2])
    determinant = jacobian_determinant_map(displacement)
    return scores.get(1, 0.0), scores.get(2, 0.0), folding_percent(determinant), sdlogj(determinant)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm")
    parser.add_argument("--cases", type=int, default=3, help="number of deformed copies")
    parser.add_argument("--methods", default="io",
                        help="comma-separated library methods (deepreg methods)")
    parser.add_argument("--peers", default="ants", help="comma-separated peers (ants, demons)")
    args = parser.parse_args(argv)
    import SimpleITK as sitk
    from DeepRegistrationLib.metrics import dice
    from DeepRegistrationLib.sample_data import demo_pair

    tools = [m for m in args.methods.split(",") if m] + [p for p in args.peers.split(",") if p]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case in range(args.cases):
            seed = 7 + case
            fixed, moving, fixed_labels, moving_labels = demo_pair(args.spacing, seed=seed)
            before = dice(sitk.GetArrayFromImage(fixed_labels),
                          sitk.GetArrayFromImage(moving_labels), labels=[1, 2])
            rows.append(("none", seed, before[1], before[2], 0.0, 0.0, 0.0, float("nan")))
            for tool in tools:
                displacement, seconds, peak = run_in_fresh_process(tool, args.spacing, seed,
                                                                   folder)
                gm, wm, folding, spread = evaluate(displacement, fixed, fixed_labels,
                                                   moving_labels)
                rows.append((tool, seed, gm, wm, folding, spread, seconds, peak))
                print(f"case {seed} {tool}: Dice GM {gm:.3f} WM {wm:.3f}, folding "
                      f"{folding:.4f}%, {seconds:.1f} s, {peak:.0f} MB", file=sys.stderr)
    size = "x".join(str(n) for n in fixed.GetSize())
    print(f"\nMNI152 at {args.spacing:g} mm ({size}), {args.cases} synthetic deformations, "
          f"{os.cpu_count()} CPU cores\n")
    print("| method | Dice GM | Dice WM | % folding | SDlogJ | seconds | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for tool in ["none"] + tools:
        mine = np.array([r[2:] for r in rows if r[0] == tool], dtype=float)
        mean = mine.mean(axis=0)
        if tool == "none":
            print(f"| no registration | {mean[0]:.3f} | {mean[1]:.3f} | - | - | - | - |")
        else:
            name = "ANTs SyN" if tool == "ants" else tool
            print(f"| {name} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.4f} | {mean[3]:.3f} | "
                  f"{mean[4]:.1f} | {mean[5]:.0f} |")


if __name__ == "__main__":
    main()
