"""Does §2.2's lookup table predict the latency of UNets it never timed? Predicted vs measured, side by side.

    python bench/latency_table.py                 # the tiny UNet, 16x16 latents, batch 2, one thread
    python bench/latency_table.py --latent 32 --rounds 9

A table is built on one spec (its in-situ factor calibrates that spec exactly), then predicts the forward time of two
evolved specs: one block gone, and nine blocks (over 40% of the latency) gone. Measured times are relative to the
original spec timed in the same interleaved rounds (the quietest of several rounds), so a machine that drifts between
building the table and checking it does not decide the answer. Random weights: only shapes matter for speed. The
table's arithmetic itself is a test (tests/test_evolve.py::test_lookup_table_is_skeleton_plus_blocks_in_situ).
"""

from __future__ import annotations

import argparse

import torch

from snapfusion_min.arch import tiny
from snapfusion_min.cost import cpu_flags, median_times, threads
from snapfusion_min.evolve import Action, evolve_unet
from snapfusion_min.latency import measure_table, whole_inputs
from snapfusion_min.unet import UNet

MANY = ["-down1.A0", "-up3.A0", "-up3.A1", "-mid.R0", "-down2.R1+up2.R0", "-up1.A2", "-down1.A1", "-up3.A2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the quietest is kept")
    args = p.parse_args()
    torch.manual_seed(0)
    unet = UNet(tiny(32)).eval()
    one = evolve_unet(unet, Action("-", ("up3.A2",)))
    many = unet
    for action in MANY:
        many = evolve_unet(many, Action(action[0], tuple(action[1:].split("+"))))
    specs = {"original": unet, "one block gone": one, "nine blocks gone": many}
    with threads(1), torch.no_grad():
        table = measure_table(unet, latent=args.latent, batch=2, context_len=16, repeat=15)
        z, t, c = whole_inputs(unet, args.latent, 2, 16)
        fns = {name: (lambda u=u: u(z, t, c)) for name, u in specs.items()}
        rounds = [median_times(fns, 2, 5) for _ in range(args.rounds)]
    quietest = {name: min(r[name] for r in rounds) for name in specs}
    print(f"tiny UNet, batch 2, {args.latent}x{args.latent} latents, 1 thread, cpu flags: {cpu_flags()}, "
          f"torch {torch.__version__}; in-situ factor {table.in_situ:.3f}, {len(table.ms)} block configurations")
    print(f"{'spec':18s}{'predicted':>11s}{'measured':>10s}{'predicted / measured':>22s}")
    for name, u in specs.items():
        predicted = table.predict(u.spec) / table.predict(unet.spec)
        measured = quietest[name] / quietest["original"]
        print(f"{name:18s}{predicted:11.3f}{measured:10.3f}{predicted / measured:22.3f}")
    print("(times relative to the original spec; 1.000 in the last column is a perfect prediction)")


if __name__ == "__main__":
    main()
