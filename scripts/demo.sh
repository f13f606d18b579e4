#!/usr/bin/env bash
# The main job end to end on the built-in tiny model. Each step is a plain cdtool command, so this
# file doubles as an example of scripting cdtool.
set -euo pipefail
out=${1:-demo-out}
rm -rf "$out"
mkdir -p "$out"
export CDTOOL_MODEL=tiny

# A fine-tuned model to start from: the tiny model with a concept folded into its weights.
python - "$out" <<'PY'
import sys
import torch
from cdtool.apply import apply_deltas
from cdtool.delta import Delta, LayerDelta
from cdtool.extract import trainable_layer_names
from cdtool.tiny import build_tiny_pipeline

pipe = build_tiny_pipeline()
g = torch.Generator().manual_seed(1)
delta = Delta(tokens={"<new1>": torch.randn(1, 32, generator=g)})
for name in trainable_layer_names(pipe.unet):
    w = pipe.unet.get_submodule(name[5:]).weight
    delta.layers[name] = LayerDelta(full=0.05 * torch.randn(w.shape, generator=g))
apply_deltas(pipe, [(delta, 1.0)])
pipe.save_pretrained(f"{sys.argv[1]}/finetuned")
PY

cdtool get-deltas "$out/finetuned" --base tiny -o "$out/cat.safetensors"
cdtool info "$out/cat.safetensors"
cdtool get-deltas "$out/cat.safetensors" -o "$out/cat.bin"          # the official layout
cdtool sample "photo of a <new1> cat" "a <new1> cat on the beach" --delta "$out/cat.safetensors" \
    -o "$out/samples" --n 2 --steps 10 --grid
cdtool sample "photo of a cat" -o "$out/base-samples" --n 2 --steps 10
echo "demo finished: see $out/samples/grid.png" >&2
