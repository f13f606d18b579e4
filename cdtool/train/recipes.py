"""The customisation methods `cdtool train` offers: their names, published defaults and caption
templates. No torch here: the command line reads these for its options (cdtool/train/methods.py holds how
each method trains)."""

from __future__ import annotations

from dataclasses import dataclass

CUSTOM_DIFFUSION = "custom-diffusion"
TEXTUAL_INVERSION = "textual-inversion"
DREAMBOOTH_LORA = "dreambooth-lora"
DREAMBOOTH = "dreambooth"


@dataclass(frozen=True)
class Defaults:
    lr: float  # base rate; the final rate is this x batch x accumulation x processes when scale_lr
    scale_lr: bool
    steps_per_concept: int
    aug: bool
    dvar_window: int
    dvar_eps: float
    batch_size: int = 4  # instance images per step and process (as many class images join them with --reg)


DEFAULTS = {
    # Kumari et al. 2023: effective batch 8 and 8e-5 (1e-5 x 4 instance images x 2 with prior)
    CUSTOM_DIFFUSION: Defaults(1e-5, True, 250, True, 180, 0.15),
    # Gal et al. 2022 as in diffusers' example and DVAR's runs: 5e-3 after scaling by a batch of 4
    TEXTUAL_INVERSION: Defaults(1.25e-3, True, 3000, False, 310, 0.15),
    # DreamBooth with LoRA as DVAR evaluates it (diffusers' train_dreambooth_lora defaults)
    DREAMBOOTH_LORA: Defaults(1e-4, False, 500, False, 440, 0.4),
    # DreamBooth as published (Ruiz et al. 2023), every UNet weight: diffusers' train_dreambooth.py
    # example with prior preservation (batch 1 + 1 class image, 5e-6 unscaled, 800 steps). The DVAR
    # paper gives no full-DreamBooth setting: its DreamBooth-LoRA window and threshold are used.
    DREAMBOOTH: Defaults(5e-6, False, 800, False, 440, 0.4, batch_size=1),
}

# DreamBooth's default identifier: the paper binds the subject to a rare token of the vocabulary,
# not trained; diffusers' examples (and common practice since) use "sks", one CLIP vocabulary entry
DREAMBOOTH_IDENTIFIER = "sks"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# Textual-inversion caption templates, written for cdtool in the spirit of the TI paper's lists:
# varied photographic (object) or artistic (style) phrasings around the placeholder.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of my {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a rendition of the {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a dark photo of the {}",
    "a blurry photo of a {}",
    "a photo of a nice {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a picture in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "a dark painting in the style of {}",
)
