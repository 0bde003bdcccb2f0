"""An example third-party adaptkit plugin package (IA3 method, ConvNeXt backbone)."""
