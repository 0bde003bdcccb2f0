"""The built ``clip`` backbone (imports torch and open_clip).

The open_clip model is kept as ``net`` with one change: every
``nn.MultiheadAttention`` is replaced by an equivalent
:class:`~adaptkit_plugins.clip.attention.ClipAttention` (fused ``in_proj``
Linear + ``out_proj`` Linear, same weights, same maths), so LoRA and the other
layer-level methods reach q, k and v. :meth:`ClipBackbone.native_state_dict` maps
the names back to open_clip's, so a merged model loads into plain open_clip.

Images arrive in adaptkit's convention (values in [-1, 1]) and are normalised with
the model's own mean/std before the image tower.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.backbone import Backbone
from adaptkit.checkpoint import check_pretrained_state, hub_directory, is_local_path, load_weights
from adaptkit.deferred import load_base_state
from adaptkit.errors import CheckpointError, DataError, PluginError, did_you_mean
from adaptkit.sites import SequenceTokenSite, index_layers
from adaptkit.surface import AttentionSite, BlockSite, LayerSite, Surface, TextSite, Tower
from adaptkit_plugins.clip.attention import ClipAttention, from_native, swap_attention, to_native
from adaptkit_plugins.clip.native import ClipNative
from adaptkit_plugins.clip.text_site import TextTokenSite

#: prefixes under which checkpoints store a CLIP's weights (adaptkit runs, DDP saves)
OWN_PREFIXES = ("backbone.net.", "net.", "module.")
#: files open_clip writes into a model directory, most specific first
DIR_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: distinct texts whose token ids are kept
TOKEN_CACHE_SIZE = 65536

_config_dir: Path | None = None
_registered: dict[str, str] = {}


#: the config open_clip writes beside its weights (``save_for_hf``, ``huggingface-cli download``)
HUB_CONFIG = "open_clip_config.json"


def hub_config(directory: Path, params: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(a model name for it, its model_cfg, its preprocess_cfg) of an open_clip hub-layout directory.
    A ``model`` the spec names whose open_clip config differs from the directory's is an error."""
    import open_clip

    path = directory / HUB_CONFIG
    try:
        config = json.loads(path.read_text())
        model_cfg = config.get("model_cfg", config)
        preprocess = dict(config.get("preprocess_cfg") or {})
        ok = all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))
    except (OSError, ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"backbone.pretrained: {path} is not an open_clip config (it needs model_cfg with embed_dim, vision_cfg and text_cfg)")
    if "model" in params.model_fields_set and open_clip.get_model_config(params.model) not in (None, model_cfg):
        raise PluginError(
            f"backbone.model: '{params.model}' is another architecture than {path} describes; "
            "leave backbone.model out: the directory says what it holds"
        )
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    return f"hub_{digest}", model_cfg, preprocess


def register_model_config(name: str, model_cfg: dict[str, Any]) -> None:
    """Make ``name`` an open_clip model config (a JSON file open_clip reads), once per content."""
    import open_clip

    global _config_dir
    text = json.dumps(model_cfg, sort_keys=True)
    if _registered.get(name) == text:
        return
    if _config_dir is None:
        _config_dir = Path(tempfile.mkdtemp(prefix="adaptkit_open_clip_"))
        atexit.register(shutil.rmtree, _config_dir, ignore_errors=True)
    path = _config_dir / f"{name}.json"
    path.write_text(text)
    open_clip.add_model_config(path)
    _registered[name] = text


@contextmanager
def quiet_open_clip() -> Any:
    """Silence open_clip's 'no pretrained weights loaded' warning for deliberately fresh models."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class _TextParts:
    """Where a CLIP's text tower lives: on the model itself (CLIP) or under ``text`` (CustomTextCLIP)."""

    def __init__(self, net: nn.Module) -> None:
        from open_clip.transformer import TextTransformer

        text = getattr(net, "text", None)
        if text is None and hasattr(net, "token_embedding"):
            self.root, self.prefix = net, "net."
            self.pool_type, self.eos_id = net.text_pool_type, getattr(net, "text_eos_id", None)
        elif isinstance(text, TextTransformer):
            if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
                raise PluginError("backbone: CLIP text towers with a class token or padding mask (CoCa) are not supported")
            self.root, self.prefix = text, "net.text."
            self.pool_type, self.eos_id = text.pool_type, text.eos_id
        else:
            raise PluginError(
                f"backbone: this open_clip model's text tower is a {type(text).__name__}; the clip backbone supports "
                "open_clip's own TextTransformer (Hugging Face text towers are not supported)"
            )
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise PluginError(f"backbone: text pooling '{self.pool_type}' is not supported")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.root, name)


class ClipBackbone(ClipNative, Backbone):
    capabilities = frozenset({"image_features", "text_features"})

    def __init__(self, net: nn.Module, tokenizer: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(net, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise PluginError(
                f"backbone: this open_clip model's image tower is a {type(visual).__name__}; the clip backbone "
                "supports ViT image towers (ResNet and timm towers are not supported)"
            )
        if visual.attn_pool is not None:
            raise PluginError("backbone: image towers with attentional pooling (CoCa) are not supported")
        self._text = _TextParts(net)
        for where, transformer in (("image", visual.transformer), ("text", self._text.transformer)):
            kinds = {type(b).__name__ for b in transformer.resblocks if not isinstance(b, ResidualAttentionBlock)}
            if kinds:
                raise PluginError(f"backbone: the {where} tower uses {', '.join(sorted(kinds))} blocks; the clip backbone supports open_clip's standard blocks")
        swap_attention(net)
        self.net = net
        self.tokenizer = tokenizer
        self._token_cache: dict[str, torch.Tensor] = {}
        self.context_length = int(self._text.positional_embedding.shape[0])
        self.in_chans = int(visual.conv1.in_channels)
        self.image_size = tuple(int(s) for s in visual.image_size)
        self.feature_dim = int(visual.output_dim)
        self.identity_normalisation = all(abs(m - 0.5) < 1e-9 for m in mean) and all(abs(s - 0.5) < 1e-9 for s in std)
        # adaptkit images are in [-1, 1]; x * a + b gives (pixel - mean) / std with pixel = (x + 1) / 2
        scale = torch.tensor([0.5 / s for s in std]).view(1, -1, 1, 1)
        shift = torch.tensor([(0.5 - m) / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)
        self.register_buffer("_pixel_scale", scale, persistent=False)
        self.register_buffer("_pixel_shift", shift, persistent=False)
        self.text_site = TextSite()
        self.text_tokens = TextTokenSite(
            dim=int(self._text.transformer.width), blocks=list(self._text.transformer.resblocks),
            token_embedding=self._text.token_embedding, tokenize=self._tokenize_plain,
        )
        self.vision_tokens = SequenceTokenSite(
            dim=int(visual.transformer.width), entry=visual.ln_pre, blocks=list(visual.transformer.resblocks),
            exit=visual.transformer, insert_at=1,
        )

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, params: Any, ctx: Any) -> "ClipBackbone":
        import open_clip

        hub_dir = hub_directory(params.pretrained, HUB_CONFIG)
        preset = ctx.preset(params.model, "clip") if hub_dir is None else None
        force_preprocess: dict[str, Any] = {}
        preset_cfg: dict[str, Any] | None = None
        name = params.model
        if hub_dir is not None:  # the directory's open_clip_config.json says what it holds
            name, preset_cfg, force_preprocess = hub_config(hub_dir, params)
            register_model_config(name, preset_cfg)
        elif preset is not None:
            preset_cfg = preset.config.get("model_cfg")
            if not isinstance(preset_cfg, dict) or not all(k in preset_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise PluginError(f"preset '{params.model}': config.model_cfg must be an open_clip config with embed_dim, vision_cfg and text_cfg")
            register_model_config(params.model, preset_cfg)
            force_preprocess = dict(preset.config.get("preprocess") or {})
        elif params.model not in open_clip.list_models() and not params.model.startswith(("hf-hub:", "local-dir:")):
            known = [p.name for p in ctx.registry.presets("clip")] + open_clip.list_models()
            raise PluginError(
                f"backbone.model: '{params.model}' is neither a clip preset nor an open_clip model{did_you_mean(params.model, known)}; "
                f"presets: {', '.join(p.name for p in ctx.registry.presets('clip'))}; open_clip models: see open_clip.list_models()"
            )
        tag = params.pretrained if isinstance(params.pretrained, str) and not is_local_path(params.pretrained) else None
        local = params.pretrained if isinstance(params.pretrained, str) and tag is None else None
        if tag is not None:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if tag not in tags:
                raise CheckpointError(
                    f"backbone.pretrained: '{tag}' is neither a local file nor an open_clip weights tag of '{name}'"
                    f"{did_you_mean(tag, tags)}; tags: {', '.join(tags) or 'none (pass a local weights file)'}"
                )
        kwargs: dict[str, Any] = {"force_quick_gelu": params.quick_gelu}
        if params.image_size is not None:
            kwargs["force_image_size"] = params.image_size
        if params.context_length is not None:
            kwargs["force_context_length"] = params.context_length
        if force_preprocess:
            kwargs["force_preprocess_cfg"] = force_preprocess
        kwargs.update(params.kwargs)
        try:
            if tag is None:
                with quiet_open_clip():
                    net = open_clip.create_model(name, pretrained=None, **kwargs)
            else:
                net = open_clip.create_model(name, pretrained=tag, require_pretrained=True, **kwargs)
        except Exception as exc:  # open_clip raises many kinds; none should reach the user as a traceback
            if tag is not None:
                raise CheckpointError(
                    f"backbone.pretrained: could not load open_clip weights '{tag}' for '{name}' "
                    f"({type(exc).__name__}: {str(exc)[:200]}); without a network, pass a local weights file instead"
                ) from None
            raise PluginError(f"backbone: open_clip could not create '{name}' with {kwargs}: {type(exc).__name__}: {exc}") from None
        try:
            tokenizer = open_clip.get_tokenizer(name, context_length=params.context_length)
        except Exception as exc:
            raise PluginError(f"backbone: no offline tokenizer for '{name}' ({type(exc).__name__}: {str(exc)[:160]})") from None
        cfg = open_clip.get_model_preprocess_cfg(net)
        mean = tuple(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        std = tuple(cfg.get("std") or open_clip.OPENAI_DATASET_STD)
        backbone = cls(net, tokenizer, mean, std)
        backbone.native_args = {  # how plain open_clip creates this architecture (native export)
            "model_name": name, "kwargs": kwargs, "preset_cfg": preset_cfg,
            "model_cfg": preset_cfg if preset_cfg is not None else open_clip.get_model_config(name),
            "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        }
        if local is not None:
            backbone.load_local(local)
        return backbone

    def input_config(self) -> Any:
        """open_clip's preprocess config: its size, interpolation and resize mode. The images
        themselves come in adaptkit's [-1, 1] (what the edit and unCLIP tasks feed too);
        this backbone applies the checkpoint's own mean/std inside :meth:`normalise_images`."""
        from adaptkit.data import InputConfig

        native = getattr(self, "native_args", {})
        cfg = native.get("preprocess_cfg", {})
        numbers = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        mean, std = cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3)
        inside = "" if self.identity_normalisation else f"; the model applies mean {numbers(mean)} std {numbers(std)} itself"
        # open_clip's 'shortest' resize + centre crop is timm's crop_pct 1.0; 'squash' resizes without a crop
        mode = "squash" if cfg.get("resize_mode") == "squash" else "center"
        return InputConfig(
            size=(int(self.image_size[0]), int(self.image_size[1])), channels=self.in_chans,
            interpolation=str(cfg.get("interpolation") or "bicubic"), crop_pct=1.0, crop_mode=mode,
            source=f"open_clip preprocess config of {native.get('model_name', 'clip')}{inside}",
        )

    def load_local(self, path: str) -> None:
        """Load a local weights file or directory: open_clip's names, ours, or an adaptkit run's file."""
        source = Path(path)
        if source.is_dir():
            found = next((source / f for f in DIR_FILES if (source / f).is_file()), None)
            source = found or source
        state = load_weights(source, "backbone.pretrained")
        for prefix in OWN_PREFIXES:
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
        state = from_native(state)
        check_pretrained_state(state, self.net.state_dict(), path)
        load_base_state(self.net, state)

    def native_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state-dict names (``net.…attn.in_proj.weight``) -> open_clip's (``…attn.in_proj_weight``)."""
        stripped = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state.items()}
        return to_native(stripped)

    # ----------------------------------------------------------------- encoders
    def normalise_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.in_chans:
            raise DataError(f"clip expects {self.in_chans}-channel images, got {images.shape[1]} channels (set data.channels={self.in_chans})")
        if self.identity_normalisation:
            return images
        return images * self._pixel_scale.to(images.dtype) + self._pixel_shift.to(images.dtype)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image features (B, feature_dim) from images in [-1, 1]."""
        features = self.net.visual(self.normalise_images(images))
        if isinstance(features, tuple):
            features = features[0]
        return F.normalize(features, dim=-1) if normalize else features

    def _tokenize_raw(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids of ``texts`` as given (no text-site transforms); learned placeholders get their own ids."""
        return self.text_tokens.tokenize(texts)

    def _tokenize_plain(self, texts: Sequence[str]) -> torch.Tensor:
        # captions and class names repeat from step to step: tokenize each distinct text once
        cache = self._token_cache
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            if len(cache) + len(missing) > TOKEN_CACHE_SIZE:
                cache.clear()
            cache.update(zip(missing, self.tokenizer(missing)))
        ids = torch.stack([cache[t] for t in texts]) if texts else torch.zeros(0, self.context_length, dtype=torch.long)
        return ids.to(self._text.positional_embedding.device)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (n, context_length) of ``texts`` after the text site's transforms (one variant each)."""
        return self._tokenize_raw(self.text_site.apply(texts))

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features (n, feature_dim).

        Strings pass through the text site (templates, system text); when a
        transform gives several variants (a template ensemble), a text's feature is
        the mean of its variants' normalised features (renormalised when
        ``normalize``). Token ids are encoded as they are.
        """
        if isinstance(texts, torch.Tensor):
            return self._encode_ids(texts, normalize)
        if isinstance(texts, str):
            raise DataError("encode_text takes a list of texts, not one string")
        variants = [self.text_site.expand(t) for t in texts]
        if all(len(v) == 1 for v in variants):
            return self._encode_ids(self._tokenize_raw([v[0] for v in variants]), normalize)
        flat = [v for group in variants for v in group]
        features = self._encode_ids(self._tokenize_raw(flat), normalize=True)
        counts = torch.tensor([len(g) for g in variants], device=features.device)
        owner = torch.repeat_interleave(torch.arange(len(variants), device=features.device), counts)
        means = torch.zeros(len(variants), features.shape[1], dtype=features.dtype, device=features.device)
        means = means.index_add(0, owner, features) / counts[:, None].to(features.dtype)
        return F.normalize(means, dim=-1) if normalize else means

    def _pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        pool = self._text.pool_type
        if pool == "argmax":
            return ids.argmax(dim=-1)
        if pool == "eos":
            return (ids == self._text.eos_id).int().argmax(dim=-1)
        fixed = 0 if pool == "first" else ids.shape[1] - 1
        return torch.full((ids.shape[0],), fixed, dtype=torch.long, device=ids.device)

    def _encode_ids(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode_ids_with_states(ids, normalize)[0]

    def _encode_ids_with_states(self, ids: torch.Tensor, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled features, every token's final state (n, L, width), the pooled position of each row)."""
        text = self._text
        if ids.dim() != 2 or ids.shape[1] != self.context_length:
            raise DataError(f"token ids must be (n, {self.context_length}), got {tuple(ids.shape)}")
        ids = ids.to(text.positional_embedding.device)
        cast = text.transformer.get_cast_dtype()
        x = self.text_tokens.embed(ids).to(cast)
        x, index = self.text_tokens.insert(x, self._pool_index(ids), text.pool_type)
        x = x + text.positional_embedding.to(cast)
        x = text.transformer(x, attn_mask=text.attn_mask)
        x = text.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), index]
        projection = text.text_projection
        if projection is not None:
            pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return (F.normalize(pooled, dim=-1) if normalize else pooled), x, index

    def encode_text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features of every token, for models that attend to the text (diffusion conditioning).

        Returns the pooled text features (n, feature_dim), the final token states
        (n, context_length, width) and a mask (n, context_length) that is true up to and
        including each text's pooled (end) token. Strings pass through the text site;
        of a template ensemble, a text's first variant is used.
        """
        if isinstance(texts, str):
            raise DataError("encode_text_tokens takes a list of texts, not one string")
        ids = self._tokenize_raw([self.text_site.expand(t)[0] for t in texts])
        pooled, states, index = self._encode_ids_with_states(ids)
        positions = torch.arange(states.shape[1], device=states.device)
        return pooled, states, positions[None, :] <= index[:, None]

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as in CLIP."""
        return self.net.logit_scale.exp().clamp(max=100.0).reshape(())

    # ----------------------------------------------------------------- surface
    def make_surface(self) -> Surface:
        visual, text = self.net.visual, self._text
        vision = self._tower(
            "vision", "image", visual.transformer, "net.visual.transformer", self.vision_tokens,
            embed=LayerSite("net.visual.conv1", "embed", visual.conv1),
        )
        vision.embeddings = ["net.visual.class_embedding", "net.visual.positional_embedding", "net.visual.conv1.weight"]
        vision.param_prefixes = ["net.visual."]
        vision.modules = index_layers(visual, "net.visual.")
        tp = text.prefix
        language = self._tower("text", "text", text.transformer, f"{tp}transformer", self.text_tokens)
        language.text = self.text_site
        language.embeddings = [f"{tp}token_embedding.weight", f"{tp}positional_embedding"]
        # the temperature belongs to the text tower: the tower that builds the classifier
        language.param_prefixes = [f"{tp}{n}" for n in ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")]
        language.param_prefixes += ["net.logit_scale", "net.logit_bias"]
        language.modules = index_layers(text.transformer, f"{tp}transformer.")
        if isinstance(text.text_projection, nn.Linear):
            language.modules[f"{tp}text_projection"] = text.text_projection
        return Surface("clip", {"vision": vision, "text": language})

    def _tower(self, name: str, modality: str, transformer: nn.Module, prefix: str, tokens: Any, embed: LayerSite | None = None) -> Tower:
        dim = int(transformer.width)
        layers: list[LayerSite] = [embed] if embed is not None else []
        blocks, attention = [], []
        for i, block in enumerate(transformer.resblocks):
            where, attn = f"{prefix}.resblocks.{i}", block.attn
            assert isinstance(attn, ClipAttention)
            for j, role in enumerate(("attn.q", "attn.k", "attn.v")):
                layers.append(LayerSite(f"{where}.attn.in_proj", role, attn.in_proj, (j * dim, (j + 1) * dim)))
            layers += [
                LayerSite(f"{where}.attn.out_proj", "attn.out", attn.out_proj),
                LayerSite(f"{where}.mlp.c_fc", "mlp.in", block.mlp.c_fc),
                LayerSite(f"{where}.mlp.c_proj", "mlp.out", block.mlp.c_proj),
            ]
            # ls_1 / ls_2 (LayerScale or Identity) output exactly the sub-layer result before the residual add
            blocks.append(BlockSite(
                where, dim, attn_output=block.ls_1, mlp_output=block.ls_2, mlp_input=block.mlp,
                norms=[n for n in (block.ln_1, block.ln_2) if isinstance(n, nn.LayerNorm)],
            ))
            attention.append(AttentionSite(
                f"{where}.attn", attn, dim, attn.num_heads, attn.head_dim,
                install=_install_attention, project_kv=_project_kv(block), supports_gate=True,
            ))
        return Tower(name=name, dim=dim, modality=modality, layers=layers, blocks=blocks, attention=attention, tokens=tokens)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "context_length": self.context_length, "image_size": self.image_size, "embed_dim": self.feature_dim}


def _install_attention(site: AttentionSite) -> None:
    site.module.kv_site = site


def _project_kv(block: nn.Module) -> Any:
    def project_kv(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return block.attn.project_kv(block.ln_1(tokens))

    return project_kv
