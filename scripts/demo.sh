#!/usr/bin/env bash
# The main job end to end on the built-in tiny model (no downloads): two concepts trained with
# prior preservation, merged in closed form, compressed, sampled and exported. Each step is a plain
# cdtool command, so this file is also an example of scripting cdtool.
set -euo pipefail
out=${1:-demo-out}
rm -rf "$out"
mkdir -p "$out"
export CDTOOL_MODEL=tiny

# "Photos" of two concepts: a red and a green patterned square (stand-ins until `cdtool prep`).
python - "$out" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image

root = Path(sys.argv[1])
for name, colour in (("cat", (200, 40, 40)), ("dog", (40, 160, 60))):
    folder = root / "data" / name
    folder.mkdir(parents=True)
    for i in range(5):
        a = np.full((80, 80, 3), 200, np.uint8)
        o = 8 + 5 * i
        a[o : o + 40, o : o + 40] = colour
        a[o + 10 : o + 30 : 4, o : o + 40] = 255
        Image.fromarray(a).save(folder / f"{i}.png")
PY

# Regularisation sets: class images from the base model (stand-ins until `cdtool regset`).
cdtool sample "photo of a cat" -o "$out/reg/cat" --n 6 --steps 10 -q
cdtool sample "photo of a dog" -o "$out/reg/dog" --n 6 --steps 10 -q

cdtool train "$out/data/cat" --class-noun cat --reg "$out/reg/cat" -o "$out/cat.safetensors" \
    --steps 40 --batch-size 2 --early-stop dvar --dvar-window 20
cdtool train "$out/data/dog" --class-noun dog --token "<new2>" --reg "$out/reg/dog" -o "$out/dog.safetensors" \
    --steps 40 --batch-size 2
cdtool merge "$out/cat.safetensors+$out/dog.safetensors" -o "$out/pets.safetensors"
cdtool compress "$out/pets.safetensors" -o "$out/pets.r4.safetensors" --rank 4
cdtool info "$out/pets.r4.safetensors"
cdtool sample "photo of a <new1> cat" "a <new1> cat next to a <new2> dog" --delta "$out/pets.r4.safetensors" \
    -o "$out/samples" --n 2 --steps 10 --grid
cdtool export "$out/pets.r4.safetensors" --to diffusers-lora -o "$out/pets-lora"
echo "demo finished: $out/samples/grid.png, training logs in $out/cat.run/" >&2
