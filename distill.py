"""CFG-aware step distillation (paper §4, App. C-D): a teacher's 2N steps -> a student's N steps.

The flags and the steps are in snapfusion_min/cli/distill.py; installed, this is also ``snapfusion-distill`` and
``python -m snapfusion_min distill``. ``python distill.py --help`` shows every flag with its default.
"""

from snapfusion_min.cli import distill_command as distill

if __name__ == "__main__":
    distill.entry()
