"""What each memory option costs at SD-v1.5's size: one training step of the UNet stage (and one distillation step),
each variant in a fresh process, peak resident memory and wall time side by side in one run.

    python bench/sd_memory.py                      # writes and deletes 4 GB of weights
    python bench/sd_memory.py --resolution 256     # larger activations: where gradient checkpointing starts to pay

Random SD-v1.5 weights (the single-file layout) at a small resolution, batch 2: the numbers are memory and time, not
quality. The variants are the flags of train.py unet / distill.py (docs/sd_scale.md).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from snapfusion_min.cli.sd15_smoke import SmokeConfig, prepare

PROBE = """
import json, sys, time
from snapfusion_min.cli.sd15_smoke import peak_gib, run_command
start = time.perf_counter()
run_command(sys.argv[1], sys.argv[2:])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": peak_gib()}))
"""


def variants(work: Path, resolution: int) -> list[tuple[str, str, list[str]]]:
    data, sd, v = str(work / "data"), str(work / "sd15.safetensors"), str(work / "v.safetensors")
    base = ["--data", data, "--train-steps", "1", "--batch-size", "2", "--lr", "1e-5", "--no-state"]
    unet = ["unet", "--init", sd, "--prediction", "v", "--resolution", str(resolution), *base, "--warmup", "0"]
    distil = ["--teacher", v, "--teacher-steps", "4", "--student-steps", "2", *base, "--no-ema", "--cfg-prob", "1"]
    return [("UNet step: AdamW + EMA (the defaults)", "train", [*unet, "--out", v]),
            ("UNet step: AdamW, --no-ema", "train", [*unet, "--no-ema", "--out", v]),
            ("UNet step: --optimizer adafactor --no-ema", "train", [*unet, "--no-ema", "--optimizer", "adafactor",
                                                                   "--out", v]),
            ("UNet step: AdamW, --no-ema --checkpointing", "train", [*unet, "--no-ema", "--checkpointing", "--out",
                                                                    v]),
            ("UNet step: AdamW, --no-ema, MALLOC_MMAP_THRESHOLD_=65536", "train", [*unet, "--no-ema", "--out", v]),
            ("distillation step: AdamW, fp32 teacher", "distill", [*distil, "--out", str(work / "s.safetensors")]),
            ("distillation step: AdamW, --teacher-dtype bfloat16", "distill",
             [*distil, "--teacher-dtype", "bfloat16", "--out", str(work / "s.safetensors")])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(tmp)
        print(prepare(SmokeConfig(resolution=args.resolution), work), flush=True)
        print(f"| variant (resolution {args.resolution}, batch 2, 1 step) | peak RSS | wall |\n|---|---|---|")
        for name, command, argv in variants(work, args.resolution):
            env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if "MALLOC" in name else {})}
            r = subprocess.run([sys.executable, "-c", PROBE, command, *argv], capture_output=True, text=True, env=env)
            if r.returncode:
                why = "killed: out of memory" if r.returncode == -9 else (r.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {name} | {why} | |", flush=True)
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {name} | {m['peak_gib']:.1f} GiB | {m['seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
