"""Train: the toy CLIP, the toy autoencoder, the UNet (v-prediction, robust training of Eq. 5), the pruned decoder.

The flags and the steps are in snapfusion_min/cli/train.py; installed, this is also ``snapfusion-train`` and
``python -m snapfusion_min train``. ``python train.py --help`` shows every flag with its default.
"""

from snapfusion_min.cli import train_command as train

if __name__ == "__main__":
    train.entry()
