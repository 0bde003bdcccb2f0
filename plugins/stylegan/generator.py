"""The built ``stylegan2`` backbone: generator, surface and checkpoint loading (imports torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.backbone import Backbone
from adaptkit.base_fingerprint import note_weights_file
from adaptkit.checkpoint import load_tensors
from adaptkit.errors import CheckpointError, PluginError, did_you_mean
from adaptkit.sites import index_layers
from adaptkit.surface import BlockSite, LayerSite, Surface, Tower
from adaptkit_plugins.stylegan.networks import Generator, default_channels

#: fields of a preset's config (and of the params that override it)
CONFIG_FIELDS = ("size", "style_dim", "n_mlp", "channels", "channel_multiplier", "img_channels", "lr_mlp")
DEFAULTS = {"style_dim": 512, "n_mlp": 8, "channel_multiplier": 2, "img_channels": 3, "lr_mlp": 0.01}
#: prefixes under which adaptkit files store the generator's weights
OWN_PREFIXES = ("backbone.generator.", "generator.", "g_ema.", "g.")


def resolve_config(params: Any, ctx: Any, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The generator's configuration: the preset's, or with ``state`` (a checkpoint's generator
    tensors, and no ``model`` in the spec) the one the checkpoint's shapes imply; overridden by
    fields set in the params."""
    if state is not None:
        config = {**DEFAULTS, **config_of_state(state)}
    else:
        preset = ctx.preset(params.model, "stylegan2") if ctx is not None else None
        if preset is None:
            names = [p.name for p in ctx.registry.presets("stylegan2")] if ctx is not None else []
            raise PluginError(
                f"backbone.model: '{params.model}' is not a stylegan2 preset{did_you_mean(params.model, names)}; "
                f"presets: {', '.join(names) or 'none'}"
            )
        config = {**DEFAULTS, **dict(preset.config)}
    for key in CONFIG_FIELDS:
        value = getattr(params, key)
        if value is not None:
            config[key] = value
    if "size" not in config:
        raise PluginError(f"preset '{params.model}' gives no size")
    size = int(config["size"])
    if size < 4 or size & (size - 1):
        raise PluginError(f"backbone.size: must be a power of two >= 4, got {size}")
    channels = config.get("channels")
    if channels is None:
        channels = default_channels(int(config["channel_multiplier"]))
    channels = {int(k): int(v) for k, v in dict(channels).items()}
    needed = [2**i for i in range(2, size.bit_length())]
    missing = [r for r in needed if r not in channels]
    if missing:
        raise PluginError(f"backbone.channels: no channel count for resolutions {missing} (size {size})")
    config["channels"] = {r: channels[r] for r in needed}
    return config


def build_generator(config: dict[str, Any]) -> Generator:
    return Generator(
        size=int(config["size"]), style_dim=int(config["style_dim"]), n_mlp=int(config["n_mlp"]),
        channels=config["channels"], img_channels=int(config["img_channels"]), lr_mlp=float(config["lr_mlp"]),
    )


class StyleGan2Backbone(Backbone):
    """A StyleGAN2 generator plus its adaptation surface and latent-space helpers.

    ``generator`` holds exactly rosinality's ``Generator`` state dict. Towers:
    ``mapping`` (the MLP, roles mlp.in / mlp.out) and ``synthesis`` (roles ``conv``
    for the modulated 3x3 convs, ``modulation`` for their style linears, ``to_rgb``;
    one block per styled conv, over the channel axis).
    """

    capabilities = frozenset({"style_generator"})
    peft_problem = (
        "its modulated convolutions and equalized-learning-rate linears do not apply their layers the way PEFT's "
        "LoRA wrappers assume (PEFT would compute other images); merge the run instead (`adaptkit merge` writes "
        "generator.safetensors in rosinality's layout)"
    )

    def __init__(self, generator: Generator, config: dict[str, Any]) -> None:
        super().__init__()
        self.generator = generator
        self.config = config
        self.in_chans = generator.img_channels
        self.image_size = (generator.size, generator.size)
        self.style_dim = generator.style_dim
        self.n_latent = generator.n_latent

    @classmethod
    def create(cls, params: Any, ctx: Any) -> "StyleGan2Backbone":
        state = read_generator_file(params.pretrained, params.checkpoint_key) if isinstance(params.pretrained, str) else None
        # a checkpoint alone (no model named) says what it holds: rosinality's .pt has no config, its shapes do
        config = resolve_config(params, ctx, state if "model" not in params.model_fields_set else None)
        generator = build_generator(config)
        if state is not None:
            load_generator(generator, params.pretrained, params.checkpoint_key, config, state)
        return cls(generator, config)

    # -- latent helpers ------------------------------------------------------
    def z_from_seeds(self, seeds: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One z per seed, the same on every machine: ``randn(style_dim)`` of a CPU generator seeded with it."""
        values = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        z = torch.stack([torch.randn(self.style_dim, generator=torch.Generator().manual_seed(int(s))) for s in values])
        return z.to(self.generator.input.input.device)

    def mapping(self, z: torch.Tensor, truncation: float = 1.0, truncation_latent: torch.Tensor | None = None) -> torch.Tensor:
        """w (B, style_dim) for z (B, style_dim), pulled towards the mean w when truncation < 1."""
        w = self.generator.mapping(z)
        if truncation < 1.0:
            mean = truncation_latent if truncation_latent is not None else self.mean_latent()
            w = mean + truncation * (w - mean)
        return w

    def mean_latent(self, count: int = 4096) -> torch.Tensor:
        """The mean w of ``count`` seeded z's (StyleCLIP and rosinality use 4096)."""
        return self.generator.mean_latent(count)

    def synthesis(self, w: torch.Tensor, noise: str | Sequence[torch.Tensor | None] = "const") -> torch.Tensor:
        """Images in [-1, 1] (roughly) from W or W+ latents; ``noise="const"`` makes it deterministic."""
        return self.generator.synthesis(w, noise)

    def styles(self, w: torch.Tensor) -> list[torch.Tensor]:
        """StyleSpace (S): per-channel styles of every modulated conv."""
        return self.generator.styles(w)

    def synthesis_from_styles(self, styles: Sequence[torch.Tensor], noise: str | Sequence[torch.Tensor | None] = "const") -> torch.Tensor:
        if isinstance(noise, str):
            noise = [None] * self.generator.num_layers if noise == "random" else self.generator.noise_buffers()
        return self.generator.synthesis_from_styles(styles, noise)

    def generate(self, z: torch.Tensor, truncation: float = 1.0, noise: str = "const") -> torch.Tensor:
        return self.synthesis(self.mapping(z, truncation), noise)

    # -- surface -------------------------------------------------------------
    def make_surface(self) -> Surface:
        g = self.generator
        mapping_layers, mapping_blocks = [], []
        count = len(g.style) - 1
        for index in range(1, count + 1):
            name = f"generator.style.{index}"
            opens_pair = index % 2 == 1 and index < count
            mapping_layers.append(LayerSite(name, "mlp.in" if opens_pair else "mlp.out", g.style[index]))
            if not opens_pair:
                mapping_blocks.append(BlockSite(name, g.style_dim, mlp_output=g.style[index]))
        mapping = Tower(
            name="mapping", dim=g.style_dim, modality="latent", layers=mapping_layers, blocks=mapping_blocks,
            param_prefixes=["generator.style."], modules=index_layers(g.style, "generator.style."),
        )
        layers: list[LayerSite] = []
        blocks: list[BlockSite] = []
        styled = [("generator.conv1", g.conv1)] + [(f"generator.convs.{i}", c) for i, c in enumerate(g.convs)]
        to_rgbs = [("generator.to_rgb1", g.to_rgb1)] + [(f"generator.to_rgbs.{i}", t) for i, t in enumerate(g.to_rgbs)]
        # forward order: conv1, to_rgb1, then per resolution two convs and a ToRGB
        order = [styled[0], to_rgbs[0]]
        for i in range(len(g.to_rgbs)):
            order += [styled[1 + 2 * i], styled[2 + 2 * i], to_rgbs[1 + i]]
        for name, module in order:
            is_rgb = ".to_rgb" in name
            layers.append(LayerSite(f"{name}.conv.modulation", "modulation", module.conv.modulation))
            layers.append(LayerSite(f"{name}.conv", "to_rgb" if is_rgb else "conv", module.conv))
            if not is_rgb:
                blocks.append(BlockSite(name, module.conv.out_channels, mlp_output=module, channel_dim=1))
        synthesis = Tower(
            name="synthesis", dim=g.channels[4], modality="image", layers=layers, blocks=blocks,
            embeddings=["generator.input.input"],
            param_prefixes=["generator.input.", "generator.conv1.", "generator.to_rgb1.", "generator.convs.", "generator.to_rgbs."],
            modules={**index_layers(g.conv1, "generator.conv1."), **index_layers(g.to_rgb1, "generator.to_rgb1."),
                     **index_layers(g.convs, "generator.convs."), **index_layers(g.to_rgbs, "generator.to_rgbs.")},
        )
        return Surface("stylegan2", {"mapping": mapping, "synthesis": synthesis})

    # -- weights -------------------------------------------------------------
    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return native_generator_state(self.generator)

    def native_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """adaptkit names (``generator.convs.0...``) -> rosinality's (``convs.0...``), conv weights 5-D."""
        out = {}
        for name, tensor in state.items():
            key = name[len("generator."):] if name.startswith("generator.") else name
            if key.endswith("conv.weight") and tensor.ndim == 4:
                tensor = tensor.unsqueeze(0)
            out[key] = tensor
        return out

    # -- native export (adaptkit merge) ----------------------------------------
    def native_model(self) -> nn.Module:
        """A method-free generator of the same configuration (rosinality's layout, plain PyTorch)."""
        return build_generator(self.config)

    def native_recipe(self, native: nn.Module) -> dict[str, Any]:
        return {
            "library": "stylegan2 (rosinality stylegan2-pytorch layout)",
            "config": self.config,
            "python": "g = Generator(size, style_dim, n_mlp, channel_multiplier=...)  # rosinality's model.py; "
            "g.load_state_dict(safetensors.torch.load_file('generator.safetensors'))  # g_ema's tensors only; a run "
            "keeps latent_avg beside it, in generator.latent_avg.safetensors",
        }

    def save_native(self, native: nn.Module, directory: Path, recipe: dict[str, Any]) -> list[str]:
        save_generator(native, directory / "generator.safetensors", metadata={"format": "pt"})
        return ["generator.safetensors"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "size": self.generator.size, "style_dim": self.style_dim, "n_latent": self.n_latent}


def native_generator_state(generator: Generator) -> dict[str, torch.Tensor]:
    """The generator's own tensors in rosinality's layout, without anything a method attached."""
    return {k: v for k, v in generator.state_dict().items() if k in generator.native_keys}


# --------------------------------------------------------------------- loading
def read_generator_file(path: str | Path, key: str = "g_ema") -> dict[str, torch.Tensor]:
    """The generator tensors of a file, in rosinality's names.

    Accepts a rosinality checkpoint (a torch file holding ``g_ema`` / ``g`` / ``d`` /
    ``latent_avg``, loaded with ``weights_only=True``), a flat state dict (torch or
    safetensors), and adaptkit files (``backbone.generator.*`` from a stylegan2 run,
    ``generator.safetensors``). Everything that is not generator weights (the
    discriminator, optimizer state, ``latent_avg``) is left out.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"backbone.pretrained: {path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"backbone.pretrained: {path}: not a file")
    if path.suffix == ".safetensors":
        state: dict[str, Any] = dict(load_tensors(path)[0])
    else:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled objects; say so plainly
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"backbone.pretrained: {path}: not a weights-only torch file or safetensors ({first})"
            ) from None
        if not isinstance(loaded, dict):
            raise CheckpointError(f"backbone.pretrained: {path}: expected a mapping, got {type(loaded).__name__}")
        nested = {k: v for k, v in loaded.items() if isinstance(v, dict)}
        if nested:
            if key not in nested:
                raise CheckpointError(
                    f"backbone.pretrained: {path} has no '{key}' generator; it holds {', '.join(sorted(nested))} "
                    f"(set backbone.checkpoint_key)"
                )
            loaded = nested[key]
        state = dict(loaded)
    for prefix in OWN_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    state.pop("latent_avg", None)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"backbone.pretrained: {path}: {bad[0]} is not a tensor")
    note_weights_file(path, {t.dtype for t in state.values() if t.is_floating_point()})
    return state


def config_of_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The generator configuration (size, style_dim, n_mlp, channels, img_channels) that a generator's
    tensors in rosinality's names imply; a :class:`CheckpointError` when they are not a generator's."""
    try:
        rgbs = {int(k.split(".")[1]) for k in state if k.startswith("to_rgbs.")}
        size = 2 ** (len(rgbs) + 2)
        mapping = {int(k.split(".")[1]) for k in state if k.startswith("style.") and k.endswith(".weight")}
        channels = {4: int(state["input.input"].shape[1])}
        for i in range(len(rgbs)):  # convs 2i (upsampling) and 2i+1 of resolution 2**(i+3): their output channels
            channels[2 ** (i + 3)] = int(state[f"convs.{2 * i}.conv.weight"].shape[-4])
        return {"size": size, "style_dim": int(state[f"style.{min(mapping)}.weight"].shape[1]), "n_mlp": len(mapping),
                "channels": channels, "img_channels": int(state["to_rgb1.bias"].shape[1])}
    except (KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(
            f"backbone.pretrained: the file holds no recognisable StyleGAN2 generator ({type(exc).__name__}: {exc}); "
            "name its architecture with backbone.model (a stylegan2 preset)"
        ) from None


def describe_file(state: dict[str, torch.Tensor]) -> str:
    """The generator configuration a state dict implies, for error messages."""
    parts = []
    rgbs = {k.split(".")[1] for k in state if k.startswith("to_rgbs.")}
    if "to_rgb1.bias" in state:
        parts.append(f"size {2 ** (len(rgbs) + 2)}")
        parts.append(f"img_channels {state['to_rgb1.bias'].shape[1]}")
    if "style.1.weight" in state:
        parts.append(f"style_dim {state['style.1.weight'].shape[1]}")
        parts.append(f"n_mlp {len({k.split('.')[1] for k in state if k.startswith('style.')})}")
    if "input.input" in state:
        parts.append(f"{state['input.input'].shape[1]} channels at 4x4")
    return ", ".join(parts) or "no recognisable StyleGAN2 generator"


def load_generator(generator: Generator, path: str | Path, key: str = "g_ema", config: dict[str, Any] | None = None,
                   state: dict[str, torch.Tensor] | None = None) -> None:
    """Load generator weights into ``generator`` (``state``: the file's, when already read), with
    errors that name what does not match.

    Buffers a file may lack (noise maps, blur kernels: adaptkit adapter files hold
    only trained parameters) keep their built values; missing parameters are errors.
    """
    state = read_generator_file(path, key) if state is None else state
    own = generator.state_dict()
    built = ", ".join(f"{k} {v}" for k, v in (config or {}).items() if k in ("size", "style_dim", "n_mlp", "img_channels"))
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        adapter_like = [k for k in unexpected if any(w in k for w in ("lora", "adapter", "prompt", "prefix"))]
        if adapter_like:
            raise CheckpointError(
                f"backbone.pretrained: {path} holds method tensors (e.g. {adapter_like[0]}): it is an adapter, not base "
                "weights; load it onto its run's spec (adaptkit edit RUN_DIR) or merge it first"
            )
        raise CheckpointError(
            f"backbone.pretrained: {path} holds {len(unexpected)} tensors this generator lacks (e.g. {unexpected[0]}); "
            f"the file looks like: {describe_file(state)}; this spec builds: {built}"
        )
    buffers = {name for name, _ in generator.named_buffers()}
    missing = sorted(k for k in set(own) - set(state) if k not in buffers)
    if missing:
        raise CheckpointError(
            f"backbone.pretrained: {path} lacks {len(missing)} of the generator's tensors (e.g. {missing[0]}); "
            f"the file looks like: {describe_file(state)}; this spec builds: {built}"
        )
    for name, tensor in state.items():
        expected = tuple(own[name].shape)
        shape = tuple(tensor.shape)
        # conv weights: rosinality's (1, out, in, k, k) or adaptkit's own (out, in, k, k)
        if shape != expected and not (len(expected) == 5 and shape == expected[1:]):
            raise CheckpointError(
                f"backbone.pretrained: {path}: {name} has shape {shape}, this generator expects {expected}; "
                f"the file looks like: {describe_file(state)}; this spec builds: {built}"
            )
    with torch.no_grad():
        generator.load_state_dict(state, strict=False)


def latent_avg_file(generator_file: str | Path) -> Path:
    """Where :func:`save_generator` keeps a safetensors generator's ``latent_avg``: beside it, as
    ``<name>.latent_avg.safetensors`` (``generator.latent_avg.safetensors`` in a stylegan2 run)."""
    generator_file = Path(generator_file)
    return generator_file.with_name(f"{generator_file.stem}.latent_avg.safetensors")


def read_latent_avg(generator_file: str | Path) -> torch.Tensor | None:
    """The ``latent_avg`` (mean W) saved with a generator file, None where there is none.

    Read from beside the file (:func:`latent_avg_file`), or from inside it where older runs and
    rosinality's ``.pt`` keep it.

    Example::

        w_avg = read_latent_avg("runs/gan/generator.safetensors")   # (style_dim,)
    """
    generator_file = Path(generator_file)
    beside = latent_avg_file(generator_file)
    if generator_file.suffix == ".safetensors" and beside.is_file():
        return load_tensors(beside)[0]["latent_avg"]
    if generator_file.suffix == ".safetensors":
        return load_tensors(generator_file)[0].get("latent_avg")  # a run written before it moved beside
    try:
        loaded = torch.load(str(generator_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects; say so plainly
        raise CheckpointError(f"{generator_file}: not a weights-only torch file or safetensors ({type(exc).__name__})") from None
    return loaded.get("latent_avg") if isinstance(loaded, dict) else None


def save_generator(generator: Generator, path: str | Path, latent_avg: torch.Tensor | None = None,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Write the generator in rosinality's layout: ``.pt`` as ``{"g_ema": state, "latent_avg": w}``
    (what stylegan2-pytorch's scripts load), anything else as flat safetensors holding exactly
    g_ema's tensors (so a strict ``load_state_dict`` takes it), with ``latent_avg`` in its own
    file beside it (:func:`latent_avg_file`)."""
    from adaptkit.checkpoint import save_tensors

    state = {k: v.detach().cpu().clone() for k, v in native_generator_state(generator).items()}
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        from adaptkit.rundir import atomic_path

        payload: dict[str, Any] = {"g_ema": state}
        if latent_avg is not None:
            payload["latent_avg"] = latent_avg.detach().cpu().reshape(-1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path
    if latent_avg is not None:
        save_tensors(latent_avg_file(path), {"latent_avg": latent_avg.detach().cpu().reshape(-1)})
    return save_tensors(path, state, metadata)


def clone_generator(generator: Generator, config: dict[str, Any]) -> Generator:
    """A method-free copy of ``generator`` (same weights), e.g. the frozen source for editing."""
    copy = build_generator(config).to(generator.input.input.device)
    copy.load_state_dict(native_generator_state(generator))
    return copy.requires_grad_(False)
