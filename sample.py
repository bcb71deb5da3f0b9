"""Text -> PNG files with any checkpoint: SD-v1.5 single file, diffusers folder, or a snapfusion-min checkpoint.

The flags and the steps are in snapfusion_min/cli/sample.py; installed, this is also ``snapfusion-sample`` and
``python -m snapfusion_min sample``. ``python sample.py --help`` shows every flag with its default.
"""

from snapfusion_min.cli import sample_command as sample

if __name__ == "__main__":
    sample.entry()
