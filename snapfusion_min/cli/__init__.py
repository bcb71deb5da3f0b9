"""The command line: one module per command (``sample``, ``train``, ...), and here what they share -- one meaning
per flag, defaults shown in --help, one-line errors for a user's mistakes.

Each command runs three ways: ``python sample.py`` from the repository (the top-level scripts only call in here),
``snapfusion-sample`` once installed, and ``python -m snapfusion_min sample``.

A flag used by several scripts is declared once here (``FLAGS``), with its type, its meaning and the spellings
diffusers users type (``--num_inference_steps``, ``--guidance_scale``, ``--output_dir``); a script adds it with
``flag(parser, name, default)``. ``tests/test_cli.py`` walks every script's parser and checks they agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMMANDS = ("sample", "train", "distill", "evolve", "export", "evaluate", "recipe")

# name -> (type, meaning, aliases). A type of None is a switch (store_true).
FLAGS: dict[str, tuple[type | None, str, tuple[str, ...]]] = {
    "--checkpoint": (str, "a pipeline: ours (.safetensors), an SD-v1 single file (.safetensors/.ckpt) or a "
                          "diffusers folder", ()),
    "--out": (str, "the output file", ()),
    "--out-dir": (str, "the output folder", ("--output-dir", "--output_dir")),
    "--num-inference-steps": (int, "sampling (DDIM) steps", ("--num_inference_steps",)),
    "--guidance": (float, "CFG scale w of Eq. 3; 1 = no guidance", ("--guidance-scale", "--guidance_scale")),
    "--spacing": (str, "timestep grid: leading (SD-v1.5) or trailing (distilled students, App. D)", ()),
    "--solver": (str, "ddim (Eq. 2), dpm (multistep DPM-Solver-2) or dpm++ (DPM-Solver++(2M)), as the API's solver=; "
                      "a distilled student was trained for ddim", ("--sampler",)),
    "--train-steps": (int, "optimizer steps", ("--max-train-steps", "--max_train_steps")),
    "--batch-size": (int, "images per batch (a training batch is split over DDP ranks)", ("--batch_size",)),
    "--lr": (float, "peak learning rate (AdamW, weight decay 0.01 as §5; linear warm-up, cosine decay)",
             ("--learning-rate", "--learning_rate")),
    "--accum": (int, "gradient accumulation: micro-batches per optimizer step (each of batch-size / (ranks x accum) "
                     "images)", ()),
    "--ema-decay": (float, "decay of the exponential moving average that checkpoints store", ()),
    "--keep-prob": (float, "p of Eq. 5: each block runs with probability p during training", ()),
    "--seed": (int, "same seed, same result", ()),
    "--remove": (str, "a block address (stage.name, e.g. up2.A0) to run as the identity, as Eq. 5 drops it (Fig. 5); "
                      "repeat the flag for more", ()),
    "--device": (str, "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", ()),
    "--dtype": (str, "auto (float16 on a GPU; on the CPU bfloat16 where it is native, else float32), float32, "
                     "float16 or bfloat16", ()),
    "--data": (str, "'toy' (the toy world), a folder of captioned images, or WebDataset shards (a folder of .tar, "
                    "a glob, or a brace range like shards/{00000..00999}.tar)", ()),
    "--skip-bad": (None, "leave out (and count) images without a caption, that cannot be read or that have more "
                         "than 8192 x 8192 pixels (WebDataset shards always do)", ()),
    "--optimizer": (str, "adamw, or adafactor (a factored second moment and no first: a fraction of AdamW's two "
                         "copies of the weights; bench/sd_memory.py)", ()),
    "--checkpointing": (None, "gradient checkpointing: the UNet's blocks recompute their activations in the backward "
                              "pass (less memory, ~1 more forward pass of time)", ()),
    "--amp": (None, "mixed precision: the forward pass in bfloat16 autocast on a GPU that has it and on a CPU with "
                    "native bf16, else float16 autocast with a gradient scaler; weights and optimizer stay float32",
              ()),
    "--no-ema": (None, "keep no EMA copy: checkpoints store the weights as trained (one copy of the weights less in "
                       "memory)", ()),
    "--no-state": (None, "write no <out>.state.pt (no --resume; with AdamW the state is 4x the weights on disk)", ()),
    "--workers": (int, "data-loader processes decoding WebDataset shards (0: the training process decodes)", ()),
    "--save-every": (int, "write the checkpoint and the resumable state every N optimizer steps", ()),
    "--resume": (None, "continue exactly from <out>.state.pt", ()),
    "--overwrite": (None, "start afresh over an --out whose <out>.state.pt holds a resumable run", ()),
    "--stop-after": (int, "run at most N optimizer steps in this invocation, save, exit (then --resume)", ()),
    "--num-prompts": (int, "held-out prompts to judge on", ()),
    "--prompts-file": (str, "prompts: a text file, one per line, or MS-COCO's captions_*.json (one caption per "
                            "image, chosen with --seed)", ()),
    "--clip-weights": (str, "makes --clip an open_clip model name (e.g. ViT-g-14, the paper's judge): its weights "
                            "file, read locally (never downloaded)", ()),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and shows every default (unless the help text already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def parser(doc: str, **kw: Any) -> argparse.ArgumentParser:  # noqa: ANN401
    """An ArgumentParser whose description is the script's docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, **kw)


def flag(p: argparse.ArgumentParser | Any, name: str, default: Any = None, more: str = "",  # noqa: ANN401
         **kw: Any) -> None:  # noqa: ANN401
    """Add a shared flag with its one meaning (``more`` adds what it does in this script)."""
    kind, meaning, aliases = FLAGS[name]
    text = meaning + (f"; {more}" if more else "")
    if kind is None:
        p.add_argument(name, *aliases, action="store_true", help=text, **kw)
    else:
        p.add_argument(name, *aliases, type=kind, default=default, help=text, **kw)


def defaults(cls: type) -> argparse.Namespace:
    """The field defaults of a config dataclass, for a parser's defaults (its checks do not run)."""
    fields = dataclasses.fields(cls)
    return argparse.Namespace(**{f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                                 for f in fields if f.default is not dataclasses.MISSING
                                 or f.default_factory is not dataclasses.MISSING})


def from_args(cls: type, args: argparse.Namespace, **override: Any) -> Any:  # noqa: ANN401
    """Build the config dataclass ``cls`` from the parsed flags named like its fields (its checks run here)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **override})


def run(main: Callable[[], object], prog: str | None = None) -> None:
    """Run a command's main(): a user's mistake or a diverged run is one line on stderr and exit code 1 (``prog``,
    by default the name it was called by, starts the line)."""
    prog = prog or Path(sys.argv[0]).name
    shown = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"  # one line, no source
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:  # CheckpointError is a ValueError
        sys.exit(f"{prog}: error: {e}")
    except ImportError as e:  # an optional package not installed (the message says which extra installs it)
        if "pip install" not in str(e):
            raise
        sys.exit(f"{prog}: error: {e}")
    except (MemoryError, RuntimeError) as e:  # torch's "can't allocate memory" / CUDA out of memory
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, RuntimeError) and "alloc" not in text and "out of memory" not in text:
            raise
        sys.exit(f"{prog}: error: not enough memory ({text[:200]})")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        warnings.formatwarning = shown


def check_writable(path: str | Path, folder: bool = False) -> None:
    """Before any work: ``path`` (a file, or with ``folder`` a folder) can be created or written here."""
    path = Path(path)
    parent = path if folder else path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ValueError(f"cannot write {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {path}: permission denied")
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"cannot write {path}: it is {'a file' if folder else 'a folder'}")
