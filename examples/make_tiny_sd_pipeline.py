"""Write a tiny Stable Diffusion-style pipeline folder (random weights) for examples/sd_lora_digits.yaml.

No Stable Diffusion weights can be downloaded here, so this builds one from diffusers' and
transformers' own classes with the tiny configs of the ``sd_tiny`` preset: a 32/64-channel
UNet2DConditionModel, a 2-block AutoencoderKL, a 2-layer CLIPTextModel and OpenAI CLIP's
tokenizer (written from the BPE file open_clip ships). diffusers loads it as it loads a
downloaded one: ``StableDiffusionPipeline.from_pretrained("runs/tiny_sd_pipeline")``.

    python examples/make_tiny_sd_pipeline.py [runs/tiny_sd_pipeline] [--seed 0]
"""

from __future__ import annotations

import argparse

from adaptkit_plugins.diffusion.tiny_pipeline import write_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/tiny_sd_pipeline", help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print(f"wrote {write_tiny_pipeline(args.out, seed=args.seed)}/ (unet, vae, text_encoder, tokenizer, scheduler)")


if __name__ == "__main__":
    main()
