"""Post-training, fine-tuning and export: bias correction, refinement, QAT, packed/ONNX export; job configs and allocation steps."""
