"""Dataset tools: synthetic ImageNet-like JPEGs, Fashion-MNIST as JPEG folders, decode verification."""
