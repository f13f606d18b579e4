"""benchmarks/dreambooth_memory.py counts what autograd keeps for the backward pass: checked on
modules whose saved tensors are known, and on the tiny UNet with and without checkpointing."""

from __future__ import annotations

import torch

from benchmarks.dreambooth_memory import GB, Activations, Shape, checkpointed_bytes, saved_bytes, table


def test_a_linear_layer_and_its_activation_keep_their_input_and_output():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    # Linear keeps its input (for the weight's gradient), ReLU its output; the weight is a parameter
    assert saved_bytes(lambda: torch.relu(layer(x))) == (2 * 8 + 2 * 4) * 4


def test_attention_is_counted_as_the_fused_kernels_keep_it():
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    got = saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert got == 4 * (1 * 2 * 16 * 8) * 4 + (1 * 2 * 16) * 4  # q, k, v, out and the log-sum-exp: no 16x16 matrix


def test_checkpointing_keeps_less_on_the_tiny_unet():
    from cdtool.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline().unet.requires_grad_(True)  # as DreamBooth trains it

    def step():
        x = torch.randn(2, 4, 8, 8)
        return unet(x, torch.tensor([1, 2]), encoder_hidden_states=torch.randn(2, 77, 32)).sample

    plain = saved_bytes(step)
    kept, largest = checkpointed_bytes(unet, step)
    assert 0 < largest < plain and 0 < kept < plain


def test_the_table_adds_bytes_per_parameter():
    shape = Shape("x", unet=10**9, text=10**8, vae=10**7, latent=64, resolution=512)
    act = Activations(plain=4 * GB, checkpointed=GB, largest_block=0.1 * GB, text=0.2 * GB)
    half = Activations(plain=2 * GB, checkpointed=0.5 * GB, largest_block=0.05 * GB, text=0.1 * GB)
    rows = {r["config"]: r for r in table(shape, act, half)}
    fp32 = rows["fp32, AdamW"]
    assert (fp32["weights"], fp32["gradients"], fp32["optimiser"], fp32["frozen"]) == (4.0, 4.0, 8.0, 0.44)
    assert fp32["total"] == 4 + 4 + 8 + 0.44 + 4
    low = rows["fp16, 8-bit AdamW, gradient checkpointing, text encoder trained"]
    assert low["optimiser"] == 1.1 * 2 and low["autocast_copies"] == 1.1 * 2 and low["frozen"] == 0.01 * 2
    assert low["activations"] == 0.5 + 0.1
