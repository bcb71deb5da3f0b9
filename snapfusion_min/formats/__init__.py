"""Files this project reads and writes, below the paper's modules: ``checkpoint`` (safe reading, atomic writes,
our single-file format), ``weights`` (the key tables of SD-v1.5's LDM file and diffusers' layout), ``shards``
(WebDataset tar shards), ``images`` (image files: decoding, RGB, centre crops) and ``figures`` (PNG / SVG plots and
captioned grids, which the training stages write as they save)."""
