"""The built ConvNeXt backbone and its adaptation surface (imports torch and timm)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptkit.backbone import Backbone
from adaptkit.checkpoint import load_weights
from adaptkit.errors import CheckpointError, PluginError, did_you_mean
from adaptkit.sites import index_layers
from adaptkit.surface import BlockSite, LayerSite, Surface, Tower


class ConvNextBackbone(Backbone):
    capabilities = frozenset({"image_features"})

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.in_chans = net.stem[0].in_channels
        self.image_size = None  # any size: data keeps its own (digits: 8x8)
        self.feature_dim = net.num_features

    @classmethod
    def create(cls, params: Any, ctx: Any) -> "ConvNextBackbone":
        import timm
        from timm.models.convnext import ConvNeXt

        preset = ctx.preset(params.model, "convnext")
        arch, kwargs = (preset.config["arch"], dict(preset.config["kwargs"])) if preset else (params.model, {})
        if preset is None and not timm.is_model(arch):
            raise PluginError(f"backbone.model: '{arch}' is neither a convnext preset nor a timm model"
                              f"{did_you_mean(arch, timm.list_models('convnext*'))}")
        if params.in_chans is not None:
            kwargs["in_chans"] = params.in_chans
        for key in ("depths", "dims"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        hub = params.pretrained is True or (isinstance(params.pretrained, str) and params.pretrained.startswith(("timm/", "hf-hub:")))
        net = timm.create_model(arch, pretrained=hub, num_classes=0, drop_path_rate=params.drop_path_rate, **kwargs)
        if not isinstance(net, ConvNeXt):
            raise PluginError(f"backbone.model: '{arch}' is a {type(net).__name__}, not a ConvNeXt")
        if isinstance(params.pretrained, str) and not hub:
            state = load_weights(params.pretrained)
            state = {k.removeprefix("backbone.net."): v for k, v in state.items() if not k.startswith(("head.", "backbone.head"))}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise CheckpointError(f"backbone.pretrained: {params.pretrained} does not fit this ConvNeXt "
                                      f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        return cls(net)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def make_surface(self) -> Surface:
        net = self.net
        layers = [LayerSite("net.stem.0", "embed", net.stem[0])]
        blocks = []
        for s, stage in enumerate(net.stages):
            if isinstance(stage.downsample, nn.Sequential):
                layers.append(LayerSite(f"net.stages.{s}.downsample.1", "merge", stage.downsample[1]))
            for b, block in enumerate(stage.blocks):
                prefix = f"net.stages.{s}.blocks.{b}"
                layers += [
                    LayerSite(f"{prefix}.conv_dw", "conv", block.conv_dw),
                    LayerSite(f"{prefix}.mlp.fc1", "mlp.in", block.mlp.fc1),
                    LayerSite(f"{prefix}.mlp.fc2", "mlp.out", block.mlp.fc2),
                ]
                channel_dim = 1 if block.use_conv_mlp else -1
                blocks.append(BlockSite(prefix, block.mlp.fc2.out_channels if channel_dim == 1 else block.mlp.fc2.out_features,
                                        mlp_output=block.mlp, channel_dim=channel_dim))
        tower = Tower(name="vision", dim=net.num_features, layers=layers, blocks=blocks,
                      embeddings=[f"net.stem.{n}" for n, _ in net.stem.named_parameters()],
                      param_prefixes=["net."], modules=index_layers(net, "net."))
        return Surface("convnext", {"vision": tower})
