"""Taking a pipeline elsewhere: ``coreml`` (Core ML packages for an iPhone, §5), ``onnx`` (ONNX files for ONNX
Runtime, OpenVINO and the browser), ``parts`` (the modules both trace: chunks, Apple's layout), ``compress``
(palettization and quantization of the weights) and ``diffusers_folder`` (a folder diffusers'
``StableDiffusionPipeline`` loads)."""
