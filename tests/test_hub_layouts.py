"""Checkpoints as people have them: each library's own on-disk layout, loaded by ``pretrained: DIR`` alone.

Random weights, tiny configs, written by the libraries' own writers where they have one
(timm's ``save_for_hf``, open_clip's ``save_config_for_hf``, diffusers' ``save_pretrained``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import adaptkit
from adaptkit.errors import AdaptkitError

TIMM_TINY = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 16,
                                               "depths": (1, 1), "num_heads": (1, 2)}),
}


def spec_for(backbone: dict, task: str = "classification", **data) -> dict:
    return {"backbone": backbone, "methods": [{"name": "lora", "rank": 2}], "task": {"name": task},
            "data": {"name": "digits", **data}}


# ----------------------------------------------------------------- timm
def timm_hub_dir(tmp_path, family: str, safetensors: bool = True):
    import timm
    from timm.models import save_for_hf

    arch, kwargs = TIMM_TINY[family]
    net = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    # a checkpoint's own preprocessing: not timm's default for the architecture
    net.pretrained_cfg = {**net.pretrained_cfg, "mean": (0.25, 0.5, 0.75), "std": (0.2, 0.3, 0.4), "crop_pct": 0.8}
    directory = tmp_path / f"{family}_hub"
    save_for_hf(net, directory, safe_serialization=safetensors)
    net.reset_classifier(0)
    return directory, net.eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("safetensors", [True, False], ids=["model.safetensors", "pytorch_model.bin"])
def test_timm_hub_directory_loads_by_directory_alone(tmp_path, family, safetensors):
    directory, net = timm_hub_dir(tmp_path, family, safetensors)
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["config.json", "model.safetensors" if safetensors else "pytorch_model.bin"]
    assert json.loads((directory / "config.json").read_text())["architecture"] == TIMM_TINY[family][0]
    model = adaptkit.build(spec_for({"name": family, "pretrained": str(directory)})).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.backbone.encode_image(x), net(x))
    config = model.backbone.input_config()  # the checkpoint's preprocessing travels with it
    assert config.size == (32, 32) and config.mean == (0.25, 0.5, 0.75) and config.std == (0.2, 0.3, 0.4)
    assert config.crop_pct == 0.8


def test_timm_hub_directory_refuses_another_named_model(tmp_path):
    directory, _ = timm_hub_dir(tmp_path, "vit")
    with pytest.raises(AdaptkitError, match="leave backbone.model out"):
        adaptkit.build(spec_for({"name": "vit", "model": "vit_small_patch16_224", "pretrained": str(directory)}))
    (directory / "config.json").write_text(json.dumps({"num_classes": 3}))
    with pytest.raises(AdaptkitError, match="not a timm model config"):
        adaptkit.build(spec_for({"name": "vit", "pretrained": str(directory)}))


def test_timm_hub_directory_exports_and_merges(tmp_path):
    """A run on a hub directory merges into a plain timm model of the directory's architecture."""
    from adaptkit.native import merge_to_native

    directory, _ = timm_hub_dir(tmp_path, "vit")
    model = adaptkit.build(spec_for({"name": "vit", "pretrained": str(directory)}))
    native = merge_to_native(model)
    assert native.recipe["create_model"]["model_name"] == "vit_tiny_patch16_224"


# ----------------------------------------------------------------- open_clip
CLIP_TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "patch_size": 4, "layers": 2, "width": 32, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def clip_hub_dir(tmp_path, safetensors: bool = True):
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf

    from adaptkit_plugins.clip.model import quiet_open_clip, register_model_config

    register_model_config("test_hub_clip", CLIP_TINY)
    with quiet_open_clip():
        net = open_clip.create_model("test_hub_clip", pretrained=None)
    net.visual.image_mean, net.visual.image_std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    directory = tmp_path / "clip_hub"
    directory.mkdir()
    if safetensors:
        save_file(net.state_dict(), str(directory / "open_clip_model.safetensors"))
    else:
        torch.save(net.state_dict(), directory / "open_clip_pytorch_model.bin")
    save_config_for_hf(net, directory / "open_clip_config.json", model_config=CLIP_TINY)
    return directory, net.eval(), open_clip.get_tokenizer("test_hub_clip")


@pytest.mark.parametrize("safetensors", [True, False], ids=["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_hub_directory_loads_by_directory_alone(tmp_path, safetensors):
    directory, net, tokenizer = clip_hub_dir(tmp_path, safetensors)
    model = adaptkit.build(spec_for({"name": "clip", "pretrained": str(directory)}, "zero_shot", classes=[0, 1])).eval()
    texts = ["a photo of the digit 1."]
    torch.testing.assert_close(model.backbone.encode_text(texts), net.encode_text(tokenizer(texts)))
    assert model.backbone.image_size == (16, 16)
    # the checkpoint's preprocess config travels with it: the model normalises with its mean/std
    assert "mean (0.1, 0.2, 0.3) std (0.4, 0.5, 0.6)" in model.backbone.input_config().source


def test_open_clip_hub_directory_refuses_another_named_model(tmp_path):
    directory, _, _ = clip_hub_dir(tmp_path)
    with pytest.raises(AdaptkitError, match="leave backbone.model out"):
        adaptkit.build(spec_for({"name": "clip", "model": "ViT-B-32", "pretrained": str(directory)}, "zero_shot", classes=[0, 1]))


# ----------------------------------------------------------------- diffusers
def unet2d(**extra):
    import diffusers

    return diffusers.UNet2DModel(**{
        "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1, "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8, "attention_head_dim": 8, **extra,
    })


def unet2d_condition():
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )


def diffusion_spec(directory, **backbone) -> dict:
    return {"backbone": {"name": "ddpm_unet", "pretrained": str(directory), **backbone}, "methods": [{"name": "lora", "rank": 2}],
            "task": {"name": "text_to_image", "preview": 0}, "data": {"name": "digits"}}


def same_noise(model, unet, cond: dict, native: dict) -> None:
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    torch.testing.assert_close(model.backbone.predict_noise(x, t, cond), unet(x, t, **native).sample)


def test_diffusers_unet2d_directory_loads_by_directory_alone(tmp_path):
    unet = unet2d(num_class_embeds=11).eval()
    unet.save_pretrained(tmp_path / "unet2d")
    model = adaptkit.build(diffusion_spec(tmp_path / "unet2d", conditioning="class", num_classes=10)).eval()
    labels = torch.tensor([1, 10])
    same_noise(model, unet, {"labels": labels}, {"class_labels": labels})


def test_diffusers_unet2d_condition_directory_loads_by_directory_alone(tmp_path):
    unet = unet2d_condition().eval()
    unet.save_pretrained(tmp_path / "cond")
    spec = diffusion_spec(tmp_path / "cond", conditioning="text", text_encoder={"model": "clip_tiny_digits"})
    spec["data"] = {"name": "digits_captions"}
    model = adaptkit.build(spec).eval()
    context = torch.randn(2, 5, 64)
    same_noise(model, unet, {"context": context}, {"encoder_hidden_states": context})
    with pytest.raises(AdaptkitError, match="cond' is a cross-attention UNet; condition it on class or text"):
        adaptkit.build(diffusion_spec(tmp_path / "cond"))


def test_four_channel_unet_directory_trains_on_image_data(tmp_path):
    """A UNet with 4 input channels (a latent UNet's shape) builds with image data: the [-1, 1]
    normalisation covers every channel (it once failed: "3 normalisation values for 4 channels")."""
    unet2d(in_channels=4, out_channels=4).save_pretrained(tmp_path / "four")
    model = adaptkit.build(diffusion_spec(tmp_path / "four"), keep_data=True)
    config = model.backbone.input_config()
    assert config.channels == 4 and config.mean == (0.5,) * 4 and config.std == (0.5,) * 4
    assert model.adaptkit.data_info.channels == 4
    images = model.adaptkit.data.train.batch([0, 1])["images"]
    assert images.shape == (2, 4, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert torch.isfinite(model.training_step({"images": images, "labels": torch.tensor([0, 1])}).loss)


def test_diffusers_pipeline_folder_loads_with_its_noise_schedule(tmp_path):
    import diffusers

    unet = unet2d().eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
    model = adaptkit.build(diffusion_spec(tmp_path / "pipeline")).eval()
    same_noise(model, unet, {}, {})
    # the pipeline's scheduler travels with its UNet; a spec's own noise_schedule wins
    assert model.backbone.schedule == {"num_train_timesteps": 500, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                       "beta_end": 0.012, "prediction_type": "epsilon"}
    own = adaptkit.build(diffusion_spec(tmp_path / "pipeline", noise_schedule={"num_train_timesteps": 1000}))
    assert own.backbone.schedule["num_train_timesteps"] == 1000 and own.backbone.schedule["beta_schedule"] == "linear"


def test_auto_dtype_keeps_what_the_directory_stores(tmp_path):
    unet2d().half().save_pretrained(tmp_path / "half")
    model = adaptkit.build(diffusion_spec(tmp_path / "half", dtype="auto"))
    assert {p.dtype for p in model.backbone.unet.parameters() if not p.requires_grad} == {torch.float16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    full = adaptkit.build(diffusion_spec(tmp_path / "half"))  # fp32 unless asked
    assert {p.dtype for p in full.backbone.unet.parameters()} == {torch.float32}
    assert full.adaptkit.base_fingerprint == model.adaptkit.base_fingerprint


# ----------------------------------------------------------------- rosinality StyleGAN2
@pytest.mark.parametrize("size", [256, 1024])
def test_rosinality_checkpoint_loads_by_file_alone(tmp_path, size):
    """rosinality's .pt (``g_ema`` + ``latent_avg``) at full resolution, with narrow channels to stay small:
    the file's shapes give size, style_dim, mapping depth and channels."""
    from adaptkit_plugins.stylegan.generator import save_generator
    from adaptkit_plugins.stylegan.networks import Generator

    channels = {2**i: max(4, 64 >> i) for i in range(2, size.bit_length())}
    torch.manual_seed(0)
    generator = Generator(size=size, style_dim=16, n_mlp=3, channels=channels, img_channels=3, lr_mlp=0.01).eval()
    path = save_generator(generator, tmp_path / f"stylegan2-{size}.pt", latent_avg=torch.zeros(16))
    assert set(torch.load(path, weights_only=True)) == {"g_ema", "latent_avg"}
    spec = {"backbone": {"name": "stylegan2", "pretrained": str(path)}, "methods": [{"name": "lora", "rank": 2}],
            "task": {"name": "stylegan2"}, "data": {"name": "digits"}}
    model = adaptkit.build(spec).eval()
    ours = model.backbone.generator
    assert (ours.size, ours.style_dim, ours.n_latent) == (size, 16, generator.n_latent)
    assert model.backbone.image_size == (size, size)
    z = torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.synthesis(ours.mapping(z), noise="const"), generator.synthesis(generator.mapping(z), noise="const"))
