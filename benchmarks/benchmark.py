"""What a user waits for: whole deepreg register processes beside whole ANTs SyN processes.

Side by side in one run, with accuracy, seconds and peak memory:

    python benchmarks/benchmark.py                           # 2 mm, 3 cases, io and ANTs SyN
    python benchmarks/benchmark.py --spacing 1 --cases 1 --repeats 3
    python benchmarks/benchmark.py --methods io,vtn,r2net-svf,r2net-nsvf,ms-r2net,vm-diff
    python benchmarks/benchmark.py --tree "io (before)=/tmp/old-checkout"   # before / after
    python benchmarks/benchmark.py --spacing 1 --seeds 7 --output run1.md   # (and run2, run3)
    python benchmarks/benchmark.py --merge run1.json run2.json run3.json --output all.md
    python benchmarks/benchmark.py --output docs/benchmarks/whole-process-2mm.md

Cases: the MNI152 2009a template (nilearn) and copies deformed by random diffeomorphisms of
different seeds, with a mild intensity change and noise (``sample_data.demo_pair``), written as
compressed NIfTI files like a user's; labels are the template's grey and white matter.

Every run is a whole, fresh process, timed from its start to its exit, as the user (or Slicer's
progress bar) sees it:

- ``deepreg``: ``python -m DeepRegistrationLib register FIXED MOVING -o DIR --fixed-labels ...
  --moving-labels ...`` with every output (warped image, displacement field, Jacobian map, grid,
  warped labels, summary.json and the QA figure), exactly what the Slicer module runs;
- ANTs SyN: a process that imports ``ants`` (antspyx), reads the two files, runs
  ``ants.registration(type_of_transform="SyN")`` (its affine stage, then SyN; ANTs writes its
  transforms itself) and writes the warped image.

Seconds and peak memory (the child's ``ru_maxrss`` from ``wait4``) are medians over every run of
a tool (cases x repeats, the tools interleaved so a change in machine load hits both alike). CPU
seconds over wall seconds says how many cores a tool kept busy. Start-up is a process that only
imports what the tool imports (median of three); "after start-up" is the whole process minus it.
The registration call is ``engine.register`` (from summary.json) for ours, the
``ants.registration`` call for ANTs. Accuracy is computed here by the same library code for every
tool, after the timed process ended: the tool's final transform as a displacement field on the
fixed grid (ours: displacement.nii.gz; ANTs: its transforms composed by ANTs itself), the moving
labels warped through it (nearest neighbour), Dice per label, % of voxels with det J <= 0, SDlogJ.
The load average of the machine is printed before and after: figures taken while other jobs run
are inflated, the side-by-side ratios much less so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Targets of issue #18 (whole process, ours over ANTs SyN's, same run)
WHOLE_PROCESS_TARGET = {2.0: 0.6, 1.0: 0.25}
AFTER_STARTUP_TARGET = {2.0: 0.3}  # ours after start-up over SyN's registration call
ENGINE_TARGET_SECONDS = {2.0: 1.5, 1.0: 5.0}  # engine.register for io
PEAK_MEMORY_TARGET_MB = {1.0: 1536.0}  # io at 1 mm

ANTS_PROCESS = r"""
import json, sys, time
import ants
fixed_path, moving_path, folder = sys.argv[1:4]
fixed = ants.image_read(fixed_path)
moving = ants.image_read(moving_path)
started = time.perf_counter()
result = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=folder + "/syn_")
seconds = time.perf_counter() - started
ants.image_write(result["warpedmovout"], folder + "/warped.nii.gz")
with open(folder + "/ants.json", "w") as handle:
    json.dump({"registration_seconds": seconds, "transforms": result["fwdtransforms"]}, handle)
"""

DEEPREG_IMPORTS = ("import DeepRegistrationLib.cli, DeepRegistrationLib.images, "
                   "DeepRegistrationLib.engine, DeepRegistrationLib.outputs")


def run_process(command, env=None, cwd=None):
    """Run ``command`` to its end; wall seconds, peak resident MB and CPU seconds of that child."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({process.returncode}):\n{err}\n{out}")
    return wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def tree_env(root):
    """Environment running the library from the source tree ``root``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Tool:
    """One thing to time: a library method from a source tree, or ANTs SyN."""

    def __init__(self, label, method=None, root=ROOT):
        self.label, self.method, self.root = label, method, root
        self.runs = []  # dicts: wall, peak, cpu, registration, dice..., case

    @property
    def is_ants(self):
        return self.method is None

    def startup_command(self):
        code = "import ants" if self.is_ants else DEEPREG_IMPORTS
        return [sys.executable, "-c", code]

    def command(self, case, folder):
        if self.is_ants:
            return [sys.executable, "-c", ANTS_PROCESS, case["fixed"], case["moving"], folder]
        return [sys.executable, "-m", "DeepRegistrationLib", "register", case["fixed"],
                case["moving"], "-o", folder, "--method", self.method, "--fixed-labels",
                case["fixed_labels"], "--moving-labels", case["moving_labels"], "--quiet"]

    def run(self, case, folder):
        # cwd = the tree: ``python -m`` puts the current folder first on sys.path
        wall, peak, cpu = run_process(self.command(case, folder), tree_env(self.root), self.root)
        record = {"case": case["seed"], "wall": wall, "peak": peak, "cpu": cpu}
        if self.is_ants:
            with open(os.path.join(folder, "ants.json")) as handle:
                record["registration"] = json.load(handle)["registration_seconds"]
        else:
            with open(os.path.join(folder, "summary.json")) as handle:
                summary = json.load(handle)
            record["registration"] = summary["runtime_seconds"]
            record["timings"] = summary.get("timings_seconds", {})
        record.update(evaluate(self.field(case, folder), case))
        self.runs.append(record)
        return record

    def field(self, case, folder):
        """The tool's final transform as a voxel displacement on the fixed grid (not timed)."""
        import SimpleITK as sitk
        from DeepRegistrationLib.outputs import physical_to_displacement, read_displacement_field
        fixed = sitk.ReadImage(case["fixed"])
        if not self.is_ants:
            return read_displacement_field(os.path.join(folder, "displacement.nii.gz"), fixed)
        import ants
        from training.peers import ants_composed_field
        with open(os.path.join(folder, "ants.json")) as handle:
            transforms = json.load(handle)["transforms"]
        composed = ants_composed_field(ants.image_read(case["fixed"]),
                                       ants.image_read(case["moving"]), transforms, folder)
        return physical_to_displacement(sitk.GetArrayFromImage(composed), fixed)


def evaluate(displacement, case):
    import SimpleITK as sitk
    from DeepRegistrationLib.metrics import dice, folding_percent, jacobian_determinant_map, sdlogj
    from DeepRegistrationLib.outputs import warp_image
    fixed = sitk.ReadImage(case["fixed"])
    moving_labels = sitk.ReadImage(case["moving_labels"])
    warped = sitk.GetArrayFromImage(warp_image(moving_labels, displacement, fixed, nearest=True))
    scores = dice(sitk.GetArrayFromImage(sitk.ReadImage(case["fixed_labels"])), warped,
                  labels=[1, 2])
    determinant = jacobian_determinant_map(displacement)
    return {"dice_gm": scores.get(1, 0.0), "dice_wm": scores.get(2, 0.0),
            "folding": folding_percent(determinant), "sdlogj": sdlogj(determinant)}


def write_cases(spacing, seeds, folder):
    import SimpleITK as sitk
    from DeepRegistrationLib.metrics import dice
    from DeepRegistrationLib.sample_data import demo_pair
    written = []
    for seed in seeds:
        images = dict(zip(("fixed", "moving", "fixed_labels", "moving_labels"),
                          demo_pair(spacing, seed=seed)))
        entry = {"seed": seed, "size": images["fixed"].GetSize()}
        for name, image in images.items():
            entry[name] = os.path.join(folder, f"case{seed}_{name}.nii.gz")
            sitk.WriteImage(image, entry[name], useCompression=True)
        before = dice(sitk.GetArrayFromImage(images["fixed_labels"]),
                      sitk.GetArrayFromImage(images["moving_labels"]), labels=[1, 2])
        entry["before"] = (before.get(1, 0.0), before.get(2, 0.0))
        written.append(entry)
    return written


def median(values):
    return statistics.median(values) if values else float("nan")


def startup_seconds(tool, repeats):
    return median([run_process(tool.startup_command(), tree_env(tool.root), tool.root)[0]
                   for _ in range(repeats)])


def report(args, tools, cases, startup, loads, started, invocations=1):
    """The table; ``loads`` holds one (before, after) pair of load averages per invocation."""
    lines = []
    size = "x".join(str(n) for n in cases[0]["size"])
    runs = len(tools[0].runs)
    seeds = sorted({c["seed"] for c in cases})
    lines.append(f"MNI152 at {args.spacing:g} mm ({size} voxels), synthetic deformation seed(s) "
                 f"{', '.join(map(str, seeds))}: {runs} whole-process run(s) per tool"
                 + (f" from {invocations} invocations merged" if invocations > 1 else "")
                 + f", medians; {os.cpu_count()} CPU cores; {started:%Y-%m-%d %H:%M}.")
    busy = max(max(before[0], after[0]) for before, after in loads) > 0.5
    lines.append("Load average (1, 5, 15 min) before / after: " + "; ".join(
        f"{' '.join(f'{v:.2f}' for v in before)} / {' '.join(f'{v:.2f}' for v in after)}"
        for before, after in loads) + (" -- other jobs were running: absolute seconds are "
                                       "inflated, compare within the table." if busy else "."))
    lines.append("")
    lines.append("| tool | Dice GM | Dice WM | % folding | SDlogJ | whole process (s) | "
                 "start-up (s) | after start-up (s) | registration call (s) | CPU (s) | "
                 "CPU / wall | peak memory (MB) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    before = np.mean([c["before"] for c in cases], axis=0)
    lines.append(f"| no registration | {before[0]:.3f} | {before[1]:.3f} | - | - | - | - | - | - "
                 "| - | - | - |")
    summary = {}
    for tool in tools:
        r = tool.runs
        wall = median([x["wall"] for x in r])
        entry = {
            "dice_gm": float(np.mean([x["dice_gm"] for x in r])),
            "dice_wm": float(np.mean([x["dice_wm"] for x in r])),
            "folding": float(np.mean([x["folding"] for x in r])),
            "sdlogj": float(np.mean([x["sdlogj"] for x in r])),
            "wall": wall, "startup": startup[tool.label],
            "after_startup": wall - startup[tool.label],
            "registration": median([x["registration"] for x in r]),
            "cpu": median([x["cpu"] for x in r]),
            "cpu_per_wall": median([x["cpu"] / x["wall"] for x in r]),
            "peak": median([x["peak"] for x in r]),
            "walls": [round(x["wall"], 2) for x in r],
        }
        summary[tool.label] = entry
        lines.append(f"| {tool.label} | {entry['dice_gm']:.3f} | {entry['dice_wm']:.3f} | "
                     f"{entry['folding']:.4f} | {entry['sdlogj']:.3f} | {wall:.1f} | "
                     f"{entry['startup']:.1f} | {entry['after_startup']:.1f} | "
                     f"{entry['registration']:.1f} | {entry['cpu']:.1f} | "
                     f"{entry['cpu_per_wall']:.2f} | "
                     f"{entry['peak']:.0f} |")
    lines.append("")
    lines.append("Every run's whole-process seconds: " + "; ".join(
        f"{label} {entry['walls']}" for label, entry in summary.items()))
    ants = summary.get("ANTs SyN")
    if ants:
        lines.append("")
        lines.append("Against the targets of issue #18 (ratios of medians from this run):")
        lines.append("")
        for tool in tools:
            if tool.is_ants:
                continue
            mine = summary[tool.label]
            ratio = mine["wall"] / ants["wall"]
            line = (f"- {tool.label}: whole process {ratio:.2f}x ANTs SyN's (in CPU seconds, "
                    f"which the machine's load inflates less: {mine['cpu'] / ants['cpu']:.2f}x)")
            target = WHOLE_PROCESS_TARGET.get(args.spacing)
            if target:
                line += f" (target <= {target}x: {'met' if ratio <= target else 'missed'})"
            after = mine["after_startup"] / ants["registration"]
            line += f"; after start-up {after:.2f}x SyN's registration call"
            target = AFTER_STARTUP_TARGET.get(args.spacing)
            if target:
                line += f" (target <= {target}x: {'met' if after <= target else 'missed'})"
            target = ENGINE_TARGET_SECONDS.get(args.spacing)
            if target and tool.method == "io":
                line += (f"; engine.register {mine['registration']:.2f} s (target < {target} s: "
                         f"{'met' if mine['registration'] < target else 'missed'})")
            target = PEAK_MEMORY_TARGET_MB.get(args.spacing)
            if target and tool.method == "io":
                line += (f"; peak {mine['peak']:.0f} MB (target < {target:.0f} MB: "
                         f"{'met' if mine['peak'] < target else 'missed'})")
            lines.append(line)
    return "\n".join(lines), summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm")
    parser.add_argument("--cases", type=int, default=3, help="number of deformed copies")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool per case")
    parser.add_argument("--methods", default="io",
                        help="comma-separated library methods (deepreg methods)")
    parser.add_argument("--peers", default="ants", help="'ants' or '' (none)")
    parser.add_argument("--startup-repeats", type=int, default=3,
                        help="import-only processes per tool for the start-up figure (median)")
    parser.add_argument("--seeds", help="comma-separated case seeds (default: 7, 8, ... for "
                                         "--cases)")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                        help="also run io from this source tree (e.g. an older commit extracted "
                             "with git archive) under LABEL; repeatable")
    parser.add_argument("--output", metavar="FILE.md",
                        help="also write the table here (and the raw runs beside it as .json)")
    parser.add_argument("--merge", nargs="+", metavar="RUN.json",
                        help="no new runs: the table of the raw .json files of several "
                             "invocations together (a 1 mm comparison in runs of ~5 minutes)")
    args = parser.parse_args(argv)
    command = "python benchmarks/benchmark.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    if args.merge:
        return merge(args, command)
    from DeepRegistrationLib.runtime import configure_openmp
    configure_openmp()

    tools = [Tool(m, m) for m in args.methods.split(",") if m]
    for entry in args.tree:
        label, _, root = entry.partition("=")
        if not root or not os.path.isdir(root):
            parser.error(f"--tree wants LABEL=DIR with an existing DIR, not '{entry}'")
        tools.append(Tool(label, "io", os.path.abspath(root)))
    if "ants" in args.peers.split(","):
        tools.append(Tool("ANTs SyN", None))
    started = datetime.datetime.now()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        seeds = ([int(v) for v in args.seeds.split(",")] if args.seeds
                 else [7 + case for case in range(args.cases)])
        cases = write_cases(args.spacing, seeds, folder)
        startup = {tool.label: startup_seconds(tool, args.startup_repeats) for tool in tools}
        for case in cases:
            for repeat in range(args.repeats):
                for tool in tools:
                    with tempfile.TemporaryDirectory(dir=folder) as out:
                        record = tool.run(case, out)
                    print(f"case {case['seed']} repeat {repeat + 1} {tool.label}: Dice GM "
                          f"{record['dice_gm']:.3f} WM {record['dice_wm']:.3f}, folding "
                          f"{record['folding']:.4f}%, whole {record['wall']:.1f} s (registration "
                          f"{record['registration']:.1f} s), {record['peak']:.0f} MB, load "
                          f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    text, summary = report(args, tools, cases, startup, [(load_before, load_after)], started)
    print(text)
    if args.output:
        raw = {"command": command, "spacing": args.spacing, "load_before": load_before,
               "load_after": load_after, "started": started.isoformat(timespec="seconds"),
               "cases": [{k: c[k] for k in ("seed", "size", "before")} for c in cases],
               "startup": startup,
               "tools": {t.label: {"method": t.method, "root": t.root, "runs": t.runs}
                         for t in tools},
               "summary": summary}
        write_output(args.output, command, text, raw)


def write_output(path, command, text, raw):
    with open(path, "w") as handle:
        handle.write(f"<!-- written by: {command} -->\n\n{text}\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as handle:
        json.dump(raw, handle, indent=1)


def merge(args, command):
    """One table from the raw files of several invocations (same spacing and tools)."""
    parts = []
    for path in args.merge:
        with open(path) as handle:
            parts.append(json.load(handle))
    args.spacing = parts[0]["spacing"]
    tools = {}  # every tool of any part (a part may run one tool: short invocations alternate)
    for part in parts:
        for label, entry in part["tools"].items():
            tool = tools.setdefault(label, Tool(label, entry["method"], entry["root"]))
            tool.runs += entry["runs"]
    tools = list(tools.values())
    cases = {c["seed"]: c for part in parts for c in part["cases"]}
    startup = {tool.label: median([part["startup"][tool.label] for part in parts
                                   if tool.label in part["startup"]]) for tool in tools}
    loads = [(part["load_before"], part["load_after"]) for part in parts]
    started = datetime.datetime.fromisoformat(parts[0]["started"])
    text, summary = report(args, tools, list(cases.values()), startup, loads, started,
                           invocations=len(parts))
    text += "\n\nMerged from: " + ", ".join(os.path.basename(p) for p in args.merge)
    print(text)
    if args.output:
        write_output(args.output, command, text, {"command": command, "merged": args.merge,
                                                  "summary": summary})


if __name__ == "__main__":
    main()
