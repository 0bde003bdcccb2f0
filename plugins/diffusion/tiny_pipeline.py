"""Tiny Stable Diffusion-style pipelines built offline (imports torch, diffusers, transformers).

No Stable Diffusion weights can be downloaded where adaptkit is tested, so tests,
examples and benchmarks make their own pipeline folder from diffusers' and
transformers' own classes with tiny configs: a UNet2DConditionModel with 32/64
channels (the ``sd_tiny`` preset), a 2-block AutoencoderKL, a 2-layer CLIPTextModel and a CLIPTokenizer whose
``vocab.json`` / ``merges.txt`` are written from the BPE file open_clip ships (the
same BPE as OpenAI CLIP's). ``StableDiffusionPipeline.from_pretrained(folder)`` loads
the result. Example::

    from adaptkit_plugins.diffusion.tiny_pipeline import write_tiny_pipeline

    write_tiny_pipeline("tiny_sd", seed=0)          # then backbone: {name: sd_pipeline, pretrained: tiny_sd}
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

PRESET = "sd_tiny"


def preset_config(name: str = PRESET) -> dict[str, Any]:
    """The tiny configs of an ``sd_pipeline`` preset of registry.yaml (image_size, unet, vae, text, scheduler)."""
    from adaptkit.errors import PluginError
    from adaptkit.registry import registry

    preset = registry().preset(name)
    if preset is None or preset.backbone != "sd_pipeline":
        raise PluginError(f"backbone.model: '{name}' is not an sd_pipeline preset")
    return dict(preset.config)


START, END = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE is written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_bpe_files() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of OpenAI CLIP's tokenizer, from the BPE file open_clip ships (49,408 tokens)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # as open_clip's SimpleTokenizer reads them
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [START, END]
    return {token: index for index, token in enumerate(vocab)}, merges


def write_clip_tokenizer(directory: str | Path, max_length: int) -> Any:
    """Write a CLIPTokenizer (vocab.json, merges.txt, configs) to ``directory``; return it loaded."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_files()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(str(directory))
    return CLIPTokenizer.from_pretrained(str(directory))


def tiny_components(config: dict[str, Any] | None = None, seed: int | None = 0) -> dict[str, Any]:
    """unet, vae, text_encoder and scheduler of a tiny pipeline (random weights from ``seed``; None: the
    current random state)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or preset_config()
    vae_kwargs, unet_kwargs, text_kwargs = dict(config["vae"]), dict(config["unet"]), dict(config["text"])
    factor = 2 ** (len(vae_kwargs["block_out_channels"]) - 1)
    if seed is not None:
        torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=config["image_size"], **vae_kwargs)
    unet = UNet2DConditionModel(
        sample_size=config["image_size"] // factor, in_channels=vae_kwargs["latent_channels"],
        out_channels=vae_kwargs["latent_channels"], cross_attention_dim=text_kwargs["hidden_size"], **unet_kwargs,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                                **text_kwargs))
    scheduler_kwargs = dict(config["scheduler"])
    scheduler = getattr(diffusers, scheduler_kwargs.pop("class"))(**scheduler_kwargs)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "scheduler": scheduler}


def write_tiny_pipeline(directory: str | Path, seed: int = 0, config: dict[str, Any] | None = None) -> Path:
    """Write a tiny StableDiffusionPipeline folder (random weights from ``seed``) and return its path."""
    from diffusers import StableDiffusionPipeline

    config = config or preset_config()
    parts = tiny_components(config, seed)
    tokenizer = clip_tokenizer(int(config["text"]["max_position_embeddings"]))
    pipeline = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


_TOKENIZER_DIRS: dict[int, Any] = {}


def clip_tokenizer(max_length: int) -> Any:
    """A fresh CLIPTokenizer with OpenAI CLIP's vocabulary (its files are written once per process)."""
    import tempfile

    from transformers import CLIPTokenizer

    if max_length not in _TOKENIZER_DIRS:
        scratch = tempfile.TemporaryDirectory(prefix="adaptkit-clip-tokenizer-")
        write_clip_tokenizer(scratch.name, max_length)
        _TOKENIZER_DIRS[max_length] = scratch  # removed when the process exits
    return CLIPTokenizer.from_pretrained(_TOKENIZER_DIRS[max_length].name)
