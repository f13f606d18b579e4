"""Layer names: CompVis (original Stable Diffusion, SDXL's SGM) <-> diffusers."""

from __future__ import annotations

import re

_COMPVIS = re.compile(
    r"^model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?"
    r"(transformer_blocks\.\d+\.attn\d\.(?:to_[kqv]|to_out\.0))\.(weight|bias)$"
)


def compvis_to_diffusers(key: str) -> str | None:
    """Map e.g. `model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`
    to `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k` (None if not an SD1.x
    attention weight). Biases map to None: Custom Diffusion trains only weights."""
    m = _COMPVIS.match(key)
    if m is None or m.group(5) != "weight":
        return None
    block, index, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if block == "input_blocks":
        # input_blocks 1,2 / 4,5 / 7,8 hold the attentions of down_blocks 0 / 1 / 2.
        if sub != "1" or index == 0 or index % 3 == 0:
            return None
        prefix = f"down_blocks.{(index - 1) // 3}.attentions.{(index - 1) % 3}"
    elif block == "middle_block":
        if index != 1:
            return None
        prefix = "mid_block.attentions.0"
    else:
        # output_blocks 3..11 hold the attentions of up_blocks 1..3, three per block.
        if sub != "1":
            return None
        prefix = f"up_blocks.{index // 3}.attentions.{index % 3}"
    return f"unet.{prefix}.{rest}"


def diffusers_to_sgm(name: str, layers_per_block: int = 2) -> str:
    """The original (CompVis/SGM) module path of a `unet.` layer inside an attention block, e.g.
    `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k` ->
    `input_blocks.4.1.transformer_blocks.0.attn2.to_k`. Each down block holds `layers_per_block`
    input blocks after the first (and a downsampler), each up block one more: 2 in Stable Diffusion
    1.x, 2.x and XL alike."""
    m = re.match(r"^unet\.(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.(\d+)\.(.+)$", name)
    if m is None:
        raise ValueError(f"no CompVis name for {name}")
    block, a, rest = m.group(1), int(m.group(2)), m.group(3)
    if block == "mid_block":
        head = "middle_block.1"
    elif block.startswith("down_blocks"):
        head = f"input_blocks.{int(block.split('.')[1]) * (layers_per_block + 1) + a + 1}.1"
    else:
        head = f"output_blocks.{int(block.split('.')[1]) * (layers_per_block + 1) + a}.1"
    return f"{head}.{rest}"
