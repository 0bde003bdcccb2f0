"""The diffusion family: diffusers UNet and unCLIP backbones, sampling helpers and text_to_image."""
