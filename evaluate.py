"""Judge a toy-world checkpoint: generated vs real images of held-out prompts, by the toy CLIP.

The flags and the steps are in snapfusion_min/cli/evaluate.py; installed, this is also ``snapfusion-evaluate`` and
``python -m snapfusion_min evaluate``. ``python evaluate.py --help`` shows every flag with its default.
"""

from snapfusion_min.cli import evaluate_command as evaluate

if __name__ == "__main__":
    evaluate.entry()
