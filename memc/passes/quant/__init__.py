"""Mixed-precision weight quantization passes: quant-sensitivity -> allocate-bits -> quantize."""
