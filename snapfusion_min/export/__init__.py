"""Taking a pipeline elsewhere: ``coreml`` (Core ML packages for an iPhone, §5), ``coreml_parts`` (the modules it
traces: ANE-friendly attention, chunks, Apple's layout), ``compress`` (palettization and quantization of the weights)
and ``diffusers_folder`` (a folder diffusers' ``StableDiffusionPipeline`` loads)."""
