"""Judging generated images as §5 does: ``metrics`` (CLIP score with any open_clip model, FID on Inception or any
image features, zero-shot accuracy) and ``coco`` (the MS-COCO protocol: captions -> a resumable generated folder ->
CLIP score and FID)."""
