"""Evolve a robust-trained UNet to a latency target (§3.1, Alg. 1) and compare it with a baseline.

The flags and the steps are in snapfusion_min/cli/evolve.py; installed, this is also ``snapfusion-evolve`` and
``python -m snapfusion_min evolve``. ``python evolve.py --help`` shows every flag with its default.
"""

from snapfusion_min.cli import evolve_command as evolve

if __name__ == "__main__":
    evolve.entry()
