"""Weight compression of Core ML packages with coremltools' own optimizers (``coremltools.optimize.coreml``), as
Apple's ml-stable-diffusion ships its UNets: k-means palettization (each weight tensor replaced by n-bit indices into
a 2^n-entry fp16 lookup table) or 8-bit linear quantization (int8 per output channel, symmetric, with fp16 scales).

The error a scheme introduces is measured on the weights themselves, in Python on any OS: the decompressed weights
against the fp16 ones, relative Frobenius norm over all compressed tensors (and the worst single tensor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# scheme -> (kind, bits). Palettization clusters with kmeans1d (optimal 1-D k-means over the fp16 values), which
# coremltools uses for fp16 tensors of >= 10,000 elements; smaller tensors (biases, norms) stay fp16.
COMPRESSIONS = {"pal8": ("palettize", 8), "pal6": ("palettize", 6), "pal4": ("palettize", 4), "int8": ("linear", 8)}
PALETTIZE_MIN_SIZE = 10_000
QUANTIZE_MIN_SIZE = 2048  # coremltools' default threshold
SUFFIXES = ("_palettized", "_quantized")  # how decompress_weights renames a compressed constant


def check_compression(scheme: str | None, precision: str) -> None:
    """ValueError for an unknown scheme, palettization of fp32 weights, or palettization without kmeans1d."""
    if scheme is None:
        return
    if scheme not in COMPRESSIONS:
        raise ValueError(f"--compress must be one of {', '.join(COMPRESSIONS)}, got {scheme!r}")
    if COMPRESSIONS[scheme][0] == "palettize":
        if precision != "fp16":
            raise ValueError("palettization (--compress pal*) compresses fp16 weights: use --precision fp16")
        try:
            import kmeans1d  # noqa: F401  (optional: the 'compress' extra; only palettization needs it)
        except ImportError:
            raise ValueError("palettization needs kmeans1d: pip install kmeans1d (or the 'compress' extra)") from None


def compress(model: object, scheme: str) -> tuple[object, dict]:
    """The MLModel with its large weights palettized or int8-quantized (its metadata kept), and the weight error
    that introduced (``weight_error``); the original weights are read once for both."""
    import coremltools.optimize.coreml as opt  # here, not at the top: seconds to import, and only export needs it

    kind, bits = COMPRESSIONS[scheme]
    before, _ = weights(model)
    # constants that are not weights but hold -inf (the text encoder's folded causal mask) stay as they are
    masks = {name: None for name, w in before.items() if w.dtype.kind == "f" and not np.isfinite(w).all()}
    if kind == "palettize":
        op = opt.OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_tensor",
                                    weight_threshold=PALETTIZE_MIN_SIZE)
        compressed = opt.palettize_weights(model, opt.OptimizationConfig(global_config=op, op_name_configs=masks))
    else:
        op = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=QUANTIZE_MIN_SIZE)
        compressed = opt.linear_quantize_weights(model, opt.OptimizationConfig(global_config=op,
                                                                               op_name_configs=masks))
    return compressed, weight_error(before, compressed)


def weights(model: object) -> tuple[dict[str, np.ndarray], set[str]]:
    """A package's constant tensors by name, decompressed ones under their original name; and those names."""
    from coremltools.optimize.coreml import get_weights_metadata  # as above: coremltools only when exporting

    out, renamed = {}, set()
    for name, meta in get_weights_metadata(model, weight_threshold=0).items():
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                renamed.add(name)
        out[name] = np.asarray(meta.val)
    return out, renamed


def weight_error(before: dict[str, np.ndarray], compressed: object) -> dict:
    """Decompressed vs original weights (``before``: the original package's ``weights``): {'tensors': how many
    were compressed, 'relative': ||W_c - W|| / ||W|| over all of them together, 'worst': the largest relative error
    of a single one}. Tensors left uncompressed (biases, norms: below the size threshold) are exact, not counted."""
    from coremltools.optimize.coreml import decompress_weights  # as above: coremltools only when exporting

    after, renamed = weights(decompress_weights(compressed))
    if renamed - before.keys():
        raise AssertionError(f"compressed tensors not in the original package: {sorted(renamed - before.keys())[:5]}")
    diff2 = total2 = worst = 0.0
    for name in renamed:
        w, wc = before[name].astype(np.float64), after[name].astype(np.float64)
        d2, n2 = float(((wc - w) ** 2).sum()), float((w**2).sum())
        diff2, total2, worst = diff2 + d2, total2 + n2, max(worst, (d2 / max(n2, 1e-30)) ** 0.5)
    return {"tensors": len(renamed), "relative": (diff2 / max(total2, 1e-30)) ** 0.5, "worst": worst}


def package_bytes(path: Path) -> int:
    """Size of an .mlpackage folder on disk (its weight file and spec)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
