"""Module surgery: quantized twins, attention, layer lists, built-in models, forward passes, evaluation."""
