"""Upcycle cost of fine-grained experts: `spri-hf upcycle` of the real SmolLM2-135M at expert_granularity 4 (32
experts, top-8: the same active FFN width) against 1 (8 experts, top-2), stage 1 and stage 2, each command a fresh
process, rounds alternating (`measure_commands`: best of the rounds, peak RSS from the kernel).

    python -m benchmarks.perf.granularity [--runs 2] [--cache-dir ~/.cache/spri_hf/perf] [--out FILE.json]
"""

import argparse
import json
import tempfile
from pathlib import Path

from .measuring import measure_commands
from .models import smollm2_folder, upcycle_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "spri_hf" / "perf"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = smollm2_folder(cache_dir)
    with tempfile.TemporaryDirectory(prefix="spri-granularity-") as scratch:
        work = Path(scratch)
        commands = {}
        for granularity, experts, top_k in ((1, 8, 2), (4, 32, 8)):
            spec = {"experts": experts, "top_k": top_k}
            for stage in (1, 2):
                command = upcycle_command(model, work / f"g{granularity}-s{stage}", spec, init="spri", stage=stage)
                commands[f"G{granularity} stage {stage}"] = [*command, "--expert-granularity", str(granularity)]
        measured = measure_commands(commands, args.runs, work, jobs=1)
    report = {name: {key: values[key] for key in ("wall_s", "wall_s_median", "peak_rss_mb", "output_mb")}
              for name, values in measured.items()}  # fmt: skip
    for stage in (1, 2):
        fine, full = report[f"G4 stage {stage}"], report[f"G1 stage {stage}"]
        report[f"ratio G4/G1 stage {stage}"] = {key: fine[key] / full[key] for key in ("wall_s", "peak_rss_mb")}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
