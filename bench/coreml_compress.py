"""Core ML packages compressed: package size, conversion time, peak memory, weight error, per scheme.

    python bench/coreml_compress.py                       # sd15 and snapfusion UNets, fp16 / pal6 / pal4, 512x512
    python bench/coreml_compress.py --archs snapfusion --compress pal4 int8
    python bench/coreml_compress.py --checkpoint models/toy/model.safetensors --compress fp16 pal8 pal6 pal4 int8

Each row is one `export.py` in a fresh process: with --archs, `--arch A --parts unet --resolution 512` (random
weights at SD's widths), with --checkpoint all three parts of that checkpoint at its own resolution; then
`--compress C` unless C is fp16. Per package: its size (and vs fp16), its conversion + compression time as export.py
reports it, the wall time and peak memory (max RSS) of the whole command, and the relative weight error of the
compressed tensors (decompressed vs fp16). Packages are deleted after each row. Its run time is in docs/export.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(source: list[str], compress: str) -> tuple[dict, float, float]:
    """One export.py: its report rows by package, wall seconds, peak GiB."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "export.py"), *source, "--out-dir", tmp]
        if compress != "fp16":
            cmd += ["--compress", compress]
        log = Path(tmp) / "stderr.txt"  # a file, not a pipe: coremltools' progress bars would fill a pipe and block
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
        rows = json.loads((Path(tmp) / "snapfusion_min.json").read_text())["packages"]
    return rows, wall, usage.ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["sd15", "snapfusion"])
    p.add_argument("--checkpoint", help="instead of --archs: every part of this checkpoint")
    p.add_argument("--compress", nargs="+", default=["fp16", "pal6", "pal4"])
    p.add_argument("--resolution", type=int, default=512, help="with --archs")
    args = p.parse_args()
    sources = {Path(args.checkpoint).name: ["--checkpoint", args.checkpoint]} if args.checkpoint else {
        arch: ["--arch", arch, "--parts", "unet", "--resolution", str(args.resolution)] for arch in args.archs}
    print("| model | package | weights | `.mlpackage` | vs fp16 | conversion (+ compression) | wall | peak memory | "
          "weight error (worst tensor) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, source in sources.items():
        base = {}
        for c in args.compress:
            rows, wall, peak = run(source, c)
            for name, r in rows.items():
                base.setdefault(name, r["bytes"] if c == "fp16" else None)
                ratio = f"{r['bytes'] / base[name]:.2f}x" if base[name] else "—"
                e = r.get("weight_error")
                error = f"{e['relative']:.2e} ({e['worst']:.2e})" if e else "0"
                print(f"| `{label}` | {name} | {c} | {r['bytes'] / 1e6:,.1f} MB | {ratio} | {r['seconds']:.0f} s | "
                      f"{wall:.0f} s | {peak:.1f} GiB | {error} |", flush=True)


if __name__ == "__main__":
    main()
