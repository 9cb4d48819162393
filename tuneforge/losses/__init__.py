"""Loss functions: tensors in, (loss, metrics) out."""
