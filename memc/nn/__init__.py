"""memc's own torch modules, inserted by passes and lowered by codegen (quantized linear / embedding, ...)."""
