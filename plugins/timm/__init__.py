"""The timm family: ViT and Swin backbones and the helpers they share (``common``, ``params``)."""
