"""adaptkit's built-in plugins (installed as ``adaptkit_plugins``), grouped by model family.

- ``timm/``: vit, swin and the timm helpers they share;
- ``clip/``: the CLIP backbone, zero_shot, contrastive and captioned data;
- ``diffusion/``: ddpm_unet, unclip, the sampling helpers and text_to_image;
- ``stylegan/``: the StyleGAN2 backbone, the GAN task and CLIP-guided editing;
- ``methods/``, ``tasks/``, ``data/``: generic methods, tasks and data sources.

They are registered exactly like third-party plugins: registry.yaml lists these
modules, and each one exposes ``@hookimpl`` functions returning typed records.
Modules here import only pydantic at the top; torch and model libraries are imported
by the factories, inside the ``_impl`` modules. Helpers shared inside a family have
public names; a family never imports another family's ``_`` modules.
"""
