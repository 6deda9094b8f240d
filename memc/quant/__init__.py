"""Weight quantization: the format catalogue, quantizers (RTN, GPTQ), sensitivity scores and the bit allocator."""
