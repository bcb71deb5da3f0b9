"""The toy world's scaffolding: what stands in for SD-v1.5's CLIP, its autoencoder and MS-COCO's judges here.

``clip`` (the toy CLIP: text encoder of the toy models, and the judge: CLIP score, FID features, zero-shot accuracy),
``autoencoder`` (the toy KL autoencoder's training), ``teacher`` (a fresh UNet on those two), ``tables`` (the toy
world's evaluation tables), ``pixel_judge`` (the second judge, reading scenes back from pixels). The world itself --
images and captions -- is ``snapfusion_min.world``.
"""

from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "toy"  # the bundled toy models (models/toy/)
