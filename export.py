"""Export a pipeline to Core ML: text encoder, UNet (any architecture spec) and (pruned) decoder as .mlpackage files.

The flags and the steps are in snapfusion_min/cli/export.py; installed, this is also ``snapfusion-export`` and
``python -m snapfusion_min export``. ``python export.py --help`` shows every flag with its default.
"""

from snapfusion_min.cli import export_command as export

if __name__ == "__main__":
    export.entry()
