"""Weight quantization: schemes, exact quantize/dequantize, and the straight-through fake-quantizer that windows train through."""
