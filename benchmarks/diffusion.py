"""Diffusion benchmark: sample quality judged by a digits classifier, and sampling speed vs diffusers.

    python benchmarks/diffusion.py                       # every section (several minutes on 2 CPU cores)
    python benchmarks/diffusion.py --only classcond      # one section: classcond, transfer, unclip, text, textual_inversion, speed, sd, latent
    python benchmarks/diffusion.py --only text --clip runs/clip_pretrain_digits/adapter.safetensors   # reuse a CLIP

Sections:
- classcond: examples/ddpm_digits.yaml trained here; the share of samples a judge classifies
  as the requested digit (20 per digit, DDIM 50 steps, guidance 3; several guidance scales).
- transfer: a DDPM pretrained on digits 0-4 (examples/ddpm_digits_0_4.yaml) asked for 5-9
  before and after adaptation to 5-9 (LoRA: examples/ddpm_lora_digits_5_9.yaml; full fine-tuning).
- unclip: prompts "a handwritten digit seven" through text -> prior -> decoder.
- text: the GLIDE-style text-conditioned DDPM (examples/ddpm_text_digits.yaml), prompted the same way.
- textual_inversion: the text DDPM taught a new word for the sevens (examples/textual_inversion_digits.yaml);
  samples of "a handwritten digit <my-digit>" judged as 7, against the initializer word and the real word.
- speed: our DDIM loop against diffusers' DDIMPipeline with the same UNet, seed and steps.
- sd: a tiny Stable Diffusion-style pipeline: our sampling against StableDiffusionPipeline, and a LoRA
  training step against diffusers' LoRA recipe (PEFT on the UNet), on the same components.
- latent: latent diffusion trained here on the digits at 32x32 (examples/sd_digits_vae.yaml, then
  sd_digits_pretrain_0_4.yaml on digits 0-4), adapted by LoRA to 5-9 (sd_lora_digits_5_9.yaml), taught a
  word for the threes (sd_textual_inversion_digits.yaml) and "sks" for the sevens (sd_dreambooth_lora_digits.yaml);
  samples are averaged to 8x8 gray for the judge. --runs DIR keeps the runs (and reuses finished ones).

The judge is LogisticRegression(C=1, max_iter=5000) on the 64 raw pixels of the digits'
training split (about 96% test accuracy on real digits), fed generated images as (x + 1) * 8.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def judge() -> Any:
    """A digits classifier trained on the real digits' training split (the split adaptkit uses)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from adaptkit_plugins.data.image_samples import stratified_split

    digits = load_digits()
    train, _, test = stratified_split(digits.target, (0.7, 0.15, 0.15), 0)
    model = LogisticRegression(C=1, max_iter=5000).fit(digits.data[train], digits.target[train])
    judge.accuracy = float(model.score(digits.data[test], digits.target[test]))
    return model


def agreement(classifier: Any, images: torch.Tensor, wanted: list[int]) -> tuple[float, dict[int, float]]:
    """Share of images the judge labels as the wanted digit, overall and per digit."""
    pixels = ((images.clamp(-1, 1) + 1) * 8).reshape(len(images), -1).numpy()
    predicted = classifier.predict(pixels)
    wanted_array = np.asarray(wanted)
    hits = predicted == wanted_array
    per = {d: float(hits[wanted_array == d].mean()) for d in sorted(set(wanted))}
    return float(hits.mean()), per


def run_example(name: str, out: Path, overrides: list[str] = (), run_name: str | None = None) -> Any:
    import adaptkit

    spec = adaptkit.load_spec(EXAMPLES / f"{name}.yaml", [f"output.dir={out / (run_name or name)}", "train.progress=false", *overrides])
    started = time.perf_counter()
    result = adaptkit.run(spec, log=lambda *_: None)
    result.seconds = time.perf_counter() - started
    return result


def sample_digits(model: Any, digits: list[int], per_digit: int, guidance: float, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    names = [str(d) for d in digits]
    images, _ = model.generate(classes=names, num=per_digit, guidance=guidance, seed=seed, steps=50, sampler="ddim")
    return images, [d for d in digits for _ in range(per_digit)]


def clip_weights(work: Path) -> tuple[Path, str]:
    """The CLIP the unclip and text sections condition on: --clip's file, or trained once per invocation."""
    if CLIP.get("weights") is None:
        clip = run_example("clip_pretrain_digits", work)
        zero_shot = clip.metrics["test"].get("zero_shot_accuracy")
        shown = f"{100 * zero_shot:.1f}%" if isinstance(zero_shot, float) else "n/a"
        CLIP.update(weights=work / "clip_pretrain_digits" / "adapter.safetensors", note=f"CLIP {clip.seconds:.0f} s (test zero-shot {shown})")
    return CLIP["weights"], CLIP["note"]


#: the CLIP weights (and how they came about) shared by the sections of one invocation
CLIP: dict[str, Any] = {}

#: prompt wordings of the text sections: one the CLIP (and prior) never saw, one of the 8 training wordings
UNSEEN, SEEN = "a handwritten digit {word}", "the number {word}, written by hand."


def figures(rate: float, per: dict[int, float]) -> list[str]:
    """A table row's agreement and per-digit agreement."""
    return [f"{100 * rate:.1f}%", " ".join(f"{d}:{100 * v:.0f}" for d, v in per.items())]


def prompted(model: Any, classifier: Any, wording: str, per_digit: int = 20, **sampling: Any) -> list[str]:
    """A table row's figures for one wording of the ten digits: agreement, per digit, sampling seconds."""
    started = time.perf_counter()
    images, _ = model.generate(prompts=[wording.format(word=w) for w in DIGIT_WORDS], num=per_digit, seed=0, **sampling)
    rate, per = agreement(classifier, images, [d for d in range(10) for _ in range(per_digit)])
    return [*figures(rate, per), f"{time.perf_counter() - started:.1f}"]


def table(headers: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |")
    print()


# ----------------------------------------------------------------------------- sections
def classcond(work: Path, classifier: Any) -> None:
    result = run_example("ddpm_digits", work)
    model = result.model.eval()
    rows = []
    for guidance in (1.0, 3.0):
        started = time.perf_counter()
        images, wanted = sample_digits(model, list(range(10)), 20, guidance)
        seconds = time.perf_counter() - started
        rows.append([f"{guidance:g}", *figures(*agreement(classifier, images, wanted)), f"{seconds:.1f}"])
    print(f"## Class-conditional DDPM on digits (ddpm_unet_8, {result.metrics['trainable_params']:,} params, "
          f"400 steps x 128, trained in {result.seconds:.0f} s; judge test accuracy {100 * judge.accuracy:.1f}%)\n")
    table(["guidance", "judge agrees", "per digit (%)", "sampling 200 images (s)"], rows)


def transfer(work: Path, classifier: Any) -> None:
    import adaptkit

    base = run_example("ddpm_digits_0_4", work)
    pretrained = str(work / "ddpm_digits_0_4" / "adapter.safetensors")
    new = list(range(5, 10))
    rows = []
    base_model = base.model.eval()
    images, wanted = sample_digits(base_model, list(range(5)), 20, 3.0)
    rate, _ = agreement(classifier, images, wanted)
    rows.append(["pretrained on 0-4, asked for 0-4", "-", "-", f"{100 * rate:.1f}%", f"{base.seconds:.0f}"])
    # the same base asked for 5-9 through its (untrained) class rows 5-9: the adaptation spec without methods
    unadapted = adaptkit.build(adaptkit.load_spec(EXAMPLES / "ddpm_lora_digits_5_9.yaml", [f"backbone.pretrained={pretrained}", "methods=[]"]))
    images, wanted = sample_digits(unadapted.eval(), new, 20, 3.0)
    rate, _ = agreement(classifier, images, wanted)
    rows.append(["pretrained on 0-4, asked for 5-9 (no adaptation)", "0", "0", f"{100 * rate:.1f}%", "-"])
    variants = [
        ("LoRA r=4 (attn, conv, time) + class rows", "lora", []),
        ("full fine-tuning", "full", ["methods=[{name: full}]", "train.lr=1e-3", "train.weight_decay=0.01"]),
    ]
    for label, run_name, overrides in variants:
        result = run_example("ddpm_lora_digits_5_9", work, [f"backbone.pretrained={pretrained}", *overrides], run_name)
        model = result.model.eval()
        images, wanted = sample_digits(model, new, 20, 3.0)
        rate, _ = agreement(classifier, images, wanted)
        adapter = Path(result.output_dir) / "adapter.safetensors"
        rows.append([label, f"{result.metrics['trainable_params']:,} ({result.metrics['trainable_percent']:.1f}%)",
                     f"{adapter.stat().st_size / 1024:.0f} KB", f"{100 * rate:.1f}%", f"{result.seconds:.0f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print("## Adapting a DDPM pretrained on digits 0-4 to digits 5-9 (20 samples per digit, DDIM 50, guidance 3)\n")
    table(["model", "trainable params", "adapter file", "judge agrees", "train s"], rows)


def unclip(work: Path, classifier: Any) -> None:
    clip, clip_note = clip_weights(work)
    prior = run_example("unclip_prior_digits", work, [f"backbone.clip.pretrained={clip}"])
    prior_weights = work / "unclip_prior_digits" / "adapter.safetensors"
    decoder = run_example("unclip_decoder_digits", work, [f"backbone.clip.pretrained={clip}",
                                                          f"backbone.prior.pretrained={prior_weights}"])
    model = decoder.model.eval()
    rows = []
    backbone = model.backbone
    guided = backbone.prior_settings
    for label, wording, prior_guidance in ((f"{UNSEEN} (wording not seen in training)", UNSEEN, guided.guidance),
                                           (f"{SEEN} (a training wording)", SEEN, guided.guidance),
                                           (f"{UNSEEN}, prior guidance 1", UNSEEN, 1.0),
                                           (f"{SEEN}, prior guidance 1", SEEN, 1.0)):
        backbone.prior_settings = replace(guided, guidance=prior_guidance)
        rows.append([label, *prompted(model, classifier, wording)])
    backbone.prior_settings = guided
    test = decoder.model.adaptkit.data.test
    batch = test.batch(range(len(test)))
    sources = torch.cat([batch["images"][batch["labels"] == d][:2] for d in range(10)])
    images, _ = model.generate(images=sources, num=10, seed=0)
    rate, per = agreement(classifier, images, [d for d in range(10) for _ in range(20)])
    rows.append(["image variations (2 test images per digit x 10)", *figures(rate, per), "-"])
    print(f"## unCLIP on digits: {clip_note}, prior {prior.seconds:.0f} s, "
          f"decoder {decoder.seconds:.0f} s of training; 20 samples per digit, prior 25 steps guidance 4, decoder DDIM 50 guidance 3\n")
    table(["prompt", "judge agrees", "per digit (%)", "sampling s"], rows)


#: the text-conditioned DDPM as examples/ddpm_text_digits.yaml has it, and variations on it: (label, run name,
#: overrides; "{work}" is the work directory, where earlier variants' runs are)
TEXT_VARIANTS = [
    ("UNet from scratch, text tower frozen (the example)", "ddpm_text_digits", []),
    ("the example + 200 steps of prompt tuning (8 context tokens per cross-attention)", "ddpm_text_prompt",
     ["backbone.pretrained={work}/ddpm_text_digits/adapter.safetensors", "methods=[{name: prompt, tower: unet, route: tokens, count: 8}]",
      "train.max_steps=200", "train.eval_every=100", "train.lr=3e-2", "train.weight_decay=0"]),
]


def text(work: Path, classifier: Any) -> None:
    clip, clip_note = clip_weights(work)
    rows, trained = [], []
    for label, run_name, overrides in TEXT_VARIANTS:
        overrides = [o.replace("{work}", str(work)) for o in overrides]
        result = run_example("ddpm_text_digits", work, [f"backbone.text_encoder.pretrained={clip}", *overrides], run_name)
        model = result.model.eval()
        trained.append(f"{run_name} {result.metrics['trainable_params']:,} params {result.seconds:.0f} s")
        for wording in (UNSEEN, SEEN):
            for guidance in (1.0, 3.0):
                rows.append([label, f'"{wording.format(word="seven")}"', f"{guidance:g}", *prompted(model, classifier, wording, guidance=guidance)])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"## Text-conditioned DDPM (GLIDE-style) on digits: {clip_note}, frozen; training {', '.join(trained)}; "
          f"20 samples per digit, DDIM 50; \"{UNSEEN.format(word='seven')}\" is a wording not seen in training\n")
    table(["model", "prompt (shown for seven)", "guidance", "judge agrees", "per digit (%)", "sampling s"], rows)


def textual_inversion(work: Path, classifier: Any, samples: int = 100, extra: tuple[str, ...] = ()) -> None:
    """The text DDPM (examples/ddpm_text_digits.yaml, trained here) learns "<my-digit>" from the sevens."""
    clip, clip_note = clip_weights(work)
    encoder = f"backbone.text_encoder.pretrained={clip}"
    base = run_example("ddpm_text_digits", work, [encoder, *extra])
    unet = work / "ddpm_text_digits" / "adapter.safetensors"
    learned = run_example("textual_inversion_digits", work, [encoder, f"backbone.pretrained={unet}", *extra])
    model = learned.model.eval()
    rows = []
    for label, prompt in (("before: the initializer word", "a handwritten digit digit"),
                          ("learned word (64 params)", "a handwritten digit <my-digit>"),
                          ("the real word", "a handwritten digit seven")):
        for guidance in (1.0, 3.0):
            images, _ = model.generate(prompts=[prompt], num=samples, seed=0, guidance=guidance, steps=50, sampler="ddim")
            rate, _ = agreement(classifier, images, [7] * samples)
            rows.append([label, f'"{prompt}"', f"{guidance:g}", f"{100 * rate:.1f}%"])
    print(f"## Textual inversion on the text DDPM: {clip_note}; DDPM {base.seconds:.0f} s; the word "
          f"{learned.seconds:.0f} s ({learned.metrics['trainable_params']} params); {samples} samples, DDIM 50, seed 0\n")
    table(["prompt", "text", "guidance", "judged a 7"], rows)


def speed(work: Path, classifier: Any, repeats: int = 5) -> None:
    from diffusers import DDIMPipeline

    import adaptkit
    from adaptkit_plugins.diffusion.common import SamplerSettings, make_scheduler, sample

    rows = []
    for preset, batch in (("ddpm_unet_8", 32), ("ddpm_unet_32", 4)):
        model = adaptkit.build({"backbone": {"name": "ddpm_unet", "model": preset}, "task": {"name": "text_to_image"},
                                "data": {"name": "digits"}}).eval()
        backbone = model.backbone
        settings = SamplerSettings(sampler="ddim", steps=50, guidance=1.0)
        pipeline = DDIMPipeline(unet=backbone.unet, scheduler=make_scheduler(backbone.schedule, settings))
        pipeline.set_progress_bar_config(disable=True)

        def ours() -> torch.Tensor:
            return sample(backbone, {}, batch, settings, torch.Generator().manual_seed(0), torch.device("cpu"))

        def theirs() -> torch.Tensor:
            return pipeline(batch_size=batch, generator=torch.Generator().manual_seed(0), num_inference_steps=50,
                            eta=0.0, output_type="pt").images

        a, b = ours(), theirs()  # warm-up, and the same images
        difference = float(((a / 2 + 0.5).clamp(0, 1) - b).abs().max())
        times = interleaved({"ours": ours, "diffusers": theirs}, repeats)
        rows.append([preset, batch, *_ratio(times), f"{difference:.1e}"])
    print(f"## Sampling speed: DDIM 50 steps, unconditional, same UNet and seed ({repeats} interleaved repeats, "
          f"{torch.get_num_threads()} thread; times are the fastest repeat)\n")
    table(["UNet", "batch", "ours (s)", "DDIMPipeline (s)", "ours / diffusers", "ratio of medians", "max |difference|"], rows)


def interleaved(fns: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per repeat, the functions taking turns (machine load hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def sd(work: Path, classifier: Any, repeats: int = 5) -> None:
    """A tiny Stable Diffusion-style pipeline (32x32 images, 16x16 latents): our sampling loop against
    StableDiffusionPipeline on the same components, and a LoRA training step against diffusers' LoRA recipe
    (PEFT on the UNet, as diffusers' train_text_to_image_lora.py does)."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    import adaptkit
    from adaptkit_plugins.diffusion.tiny_pipeline import preset_config, write_tiny_pipeline

    folder = write_tiny_pipeline(work / "tiny_sd", seed=0, config={**preset_config(), "image_size": 32})
    spec = {"backbone": {"name": "sd_pipeline", "pretrained": str(folder)}, "data": {"name": "digits_captions"},
            "task": {"name": "text_to_image", "ema_decay": 0.0, "condition_dropout": 0.0}}
    model = adaptkit.build(spec).eval()
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    prompt, batch, steps = "a handwritten digit seven", 4, 20

    def ours() -> torch.Tensor:
        return model.generate(prompts=[prompt], num=batch, seed=0, steps=steps, guidance=5.0)[0]

    def theirs() -> torch.Tensor:
        return pipeline(prompt, num_images_per_prompt=batch, num_inference_steps=steps, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(0), output_type="pt", height=32, width=32).images

    with torch.no_grad():
        difference = float(((ours() / 2 + 0.5) - theirs()).abs().max())
        times = interleaved({"ours": ours, "diffusers": theirs}, repeats)
    rows = [["sampling: DDIM 20 steps, guidance 5, 4 images", *_ratio(times), f"{difference:.1e}"]]

    # one LoRA training step (rank 4 on the UNet's attention q/k/v/out), batch 16, same images and captions
    lora = {"name": "lora", "rank": 4, "alpha": 4, "tower": "unet", "targets": ["attn.q", "attn.k", "attn.v", "attn.out"]}
    trained = adaptkit.build({**spec, "methods": [lora]}).train()
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [f"a handwritten digit {DIGIT_WORDS[i % 10]}" for i in range(16)]
    ours_batch = {"images": images, "labels": torch.arange(16) % 10, "captions": captions}
    ours_opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)

    def ours_step() -> None:
        ours_opt.zero_grad()
        trained.training_step(ours_batch).loss.backward()
        ours_opt.step()

    reference = StableDiffusionPipeline.from_pretrained(str(folder))
    unet, vae, text_encoder, scheduler = reference.unet, reference.vae, reference.text_encoder, reference.scheduler
    unet.requires_grad_(False), vae.requires_grad_(False), text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.train()
    ids = reference.tokenizer(captions, padding="max_length", max_length=reference.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    their_opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)

    def their_step() -> None:  # the loop body of diffusers' examples/text_to_image/train_text_to_image_lora.py
        their_opt.zero_grad()
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        F.mse_loss(prediction.float(), noise.float(), reduction="mean").backward()
        their_opt.step()

    ours_step(), their_step()  # warm-up
    times = interleaved({"ours": ours_step, "diffusers": their_step}, repeats)
    rows.append(["LoRA training step: rank 4 on UNet attention, batch 16", *_ratio(times), "-"])
    print(f"## Stable Diffusion-style pipeline (tiny, 32x32): ours against diffusers on the same components "
          f"({repeats} interleaved repeats, {torch.get_num_threads()} thread; fastest repeat)\n")
    table(["what", "ours (s)", "diffusers (s)", "ours / diffusers", "ratio of medians", "max |difference|"], rows)


# ----------------------------------------------------------------------------- latent diffusion on the digits
LATENT = {}  # --runs: where the latent section keeps (and finds) its runs


def latent_stage(name: str, work: Path, overrides: list[str] = ()) -> tuple[Any, str]:
    """Run examples/<name>.yaml into the runs folder, or load it when a finished run of it is there already."""
    import json

    import adaptkit

    root = LATENT.get("runs", work)
    out = root / name
    marker = out / "run.json"
    if marker.is_file() and json.loads(marker.read_text()).get("status") == "done":
        return adaptkit.load_trained(out).eval(), f"{name}: reused {out}"
    result = run_example(name, root, list(overrides))
    return result.model.eval(), f"{name}: {result.seconds:.0f} s"


def latent_folder(run: str, work: Path) -> Path:
    """``adaptkit merge`` of a run (once) into the pipeline folder the next stage loads."""
    from adaptkit.cli import main as cli

    root = LATENT.get("runs", work)
    folder = root / f"{run}_pipeline"
    if not (folder / "model_index.json").is_file():
        if cli(["merge", str(root / run), str(folder), "--overwrite"]) != 0:
            raise SystemExit(f"merging {root / run} failed")
    return folder


def to_judge(images: torch.Tensor) -> torch.Tensor:
    """32x32 RGB samples in [-1, 1] -> the judge's 8x8 gray digits (channel mean, 4x4 area average)."""
    gray = images.float().mean(dim=1, keepdim=True)
    return torch.nn.functional.avg_pool2d(gray, images.shape[-1] // 8)


def judged_prompts(model: Any, classifier: Any, prompts: list[str], wanted: list[int], per: int, guidance: float) -> list[str]:
    images, _ = model.generate(prompts=prompts, num=per, seed=0, guidance=guidance, steps=50, sampler="ddim")
    rate, by_digit = agreement(classifier, to_judge(images), [d for d in wanted for _ in range(per)])
    return figures(rate, by_digit)


def latent(work: Path, classifier: Any, per: int = 20) -> None:
    """Latent diffusion on the digits at 32x32: VAE, UNet on 0-4, then LoRA to 5-9, textual inversion, LoRA-DreamBooth."""
    from adaptkit_plugins.data.digits import load_digit_images
    from adaptkit_plugins.data.image_samples import fit_images, stratified_split

    notes = []
    vae, note = latent_stage("sd_digits_vae", work)
    notes.append(note)
    # the VAE alone: test digits through encoder and decoder, judged like samples
    images, _, digits = load_digit_images(None)
    _, _, test = stratified_split(digits, (0.7, 0.15, 0.15), 0)
    real = fit_images(images[test], (32, 32), 3)
    with torch.no_grad():
        decoded = torch.cat([vae.reconstruct(real[i:i + 64]) for i in range(0, len(real), 64)])
    psnr = float(10 * torch.log10(4 / (decoded - real).pow(2).mean()))
    as_real, _ = agreement(classifier, to_judge(real), list(digits[test]))
    as_decoded, _ = agreement(classifier, to_judge(decoded), list(digits[test]))
    print(f"## Latent diffusion on the digits (32x32 RGB, 8x8x4 latents): {'; '.join(notes)}\n")
    table(["VAE (sd_digits_vae)", "test digits judged correct", "PSNR (dB)", "scaling factor"],
          [["real test digits, resized to 32x32", f"{100 * as_real:.1f}%", "-", "-"],
           ["their reconstructions (posterior mean)", f"{100 * as_decoded:.1f}%", f"{psnr:.1f}", f"{vae.latent_scale.factor:.4f}"]])

    latent_folder("sd_digits_vae", work)
    overrides = [f"backbone.pretrained={LATENT.get('runs', work) / 'sd_digits_vae_pipeline'}"]
    base, note = latent_stage("sd_digits_pretrain_0_4", work, overrides)
    notes.append(note)
    folder = latent_folder("sd_digits_pretrain_0_4", work)
    on_base = [f"backbone.pretrained={folder}"]
    lora, note_lora = latent_stage("sd_lora_digits_5_9", work, on_base)
    word, note_word = latent_stage("sd_textual_inversion_digits", work, on_base)
    booth, note_booth = latent_stage("sd_dreambooth_lora_digits", work, on_base)
    notes += [note_lora, note_word, note_booth]

    def digits_prompts(ds: list[int]) -> list[str]:
        return [f"a handwritten digit {d}" for d in ds]

    low, high = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    rows = []
    for guidance in (1.0, 3.0):
        rows.append(["UNet on 0-4 (sd_digits_pretrain_0_4)", "digits 0-4", f"{guidance:g}",
                     *judged_prompts(base, classifier, digits_prompts(low), low, per, guidance)])
        rows.append(["UNet on 0-4, no adaptation", "digits 5-9", f"{guidance:g}",
                     *judged_prompts(base, classifier, digits_prompts(high), high, per, guidance)])
        rows.append(["+ LoRA r=8 on 5-9 (sd_lora_digits_5_9)", "digits 5-9", f"{guidance:g}",
                     *judged_prompts(lora, classifier, digits_prompts(high), high, per, guidance)])
        rows.append(["+ LoRA r=8 on 5-9", "digits 0-4 (kept?)", f"{guidance:g}",
                     *judged_prompts(lora, classifier, digits_prompts(low), low, per, guidance)])
    print(f"{per} samples per digit, DDIM 50 steps, seed 0; {'; '.join(notes[1:])}\n")
    table(["model", "prompts 'a handwritten digit N'", "guidance", "judge agrees", "per digit (%)"], rows)

    samples = 5 * per
    rows = []
    for label, model, prompt, wanted in (
        ("textual inversion: the initializer word", base, "a handwritten digit digit", 3),
        ("textual inversion: the learned word (sd_textual_inversion_digits)", word, "a handwritten digit <my-digit>", 3),
        ("textual inversion: the real word", base, "a handwritten digit 3", 3),
        ("DreamBooth: base pipeline", base, "a handwritten sks digit", 7),
        ("DreamBooth: LoRA-DreamBooth (sd_dreambooth_lora_digits)", booth, "a handwritten sks digit", 7),
    ):
        for guidance in (1.0, 3.0):
            rate, _ = judged_rate(model, classifier, prompt, wanted, samples, guidance)
            rows.append([label, f'"{prompt}"', f"{guidance:g}", f"{100 * rate:.1f}% ({wanted})"])
    for label, model in (("class prompt, base pipeline", base), ("class prompt, after LoRA-DreamBooth", booth)):
        images, _ = model.generate(prompts=["a handwritten digit"], num=samples, seed=0, guidance=3.0, steps=50, sampler="ddim")
        predicted = classifier.predict(((to_judge(images).clamp(-1, 1) + 1) * 8).reshape(samples, -1).numpy())
        spread = " ".join(f"{d}:{int((predicted == d).sum())}" for d in range(10) if (predicted == d).any())
        rows.append([label, '"a handwritten digit"', "3", f"judged as {spread}"])
    print(f"{samples} samples per prompt, DDIM 50 steps, seed 0\n")
    table(["model", "prompt", "guidance", "judged as the subject"], rows)


def judged_rate(model: Any, classifier: Any, prompt: str, wanted: int, samples: int, guidance: float) -> tuple[float, dict[int, float]]:
    images, _ = model.generate(prompts=[prompt], num=samples, seed=0, guidance=guidance, steps=50, sampler="ddim")
    return agreement(classifier, to_judge(images), [wanted] * samples)


def _ratio(times: dict[str, list[float]]) -> list[str]:
    ours_s, theirs_s = min(times["ours"]), min(times["diffusers"])
    medians = statistics.median(times["ours"]) / statistics.median(times["diffusers"])
    return [f"{ours_s:.3f}", f"{theirs_s:.3f}", f"{ours_s / theirs_s:.3f}", f"{medians:.3f}"]


SECTIONS = {"classcond": classcond, "transfer": transfer, "unclip": unclip, "text": text,
            "textual_inversion": textual_inversion, "speed": speed, "sd": sd, "latent": latent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clip", type=Path, help="the adapter.safetensors of a clip_pretrain_digits run, for unclip and text "
                        "(default: train one)")
    parser.add_argument("--runs", type=Path, help="latent: the folder of its runs (finished ones are reused; default: a "
                        "temporary folder, everything trained anew)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.runs is not None:
        LATENT["runs"] = args.runs.resolve()
    if args.clip is not None:
        if not args.clip.is_file():
            parser.error(f"--clip: {args.clip} is not a file")
        CLIP.update(weights=args.clip.resolve(), note=f"CLIP {args.clip}")
    classifier = judge()
    with tempfile.TemporaryDirectory(prefix="adaptkit-diffusion-") as tmp:
        for name in args.only or list(SECTIONS):
            started = time.perf_counter()
            SECTIONS[name](Path(tmp), classifier)
            print(f"({name}: {time.perf_counter() - started:.0f} s)\n", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
