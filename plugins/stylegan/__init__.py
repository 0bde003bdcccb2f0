"""The StyleGAN family: the StyleGAN2 backbone, the GAN task and CLIP-guided editing."""
