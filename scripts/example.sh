#!/usr/bin/env bash
# Every command scripted from a shell on the built-in tiny model (random weights, no downloads: it
# checks the plumbing, not quality; `cdtool demo` does the main job on the toy model that can see):
# photos prepared, regularisation sets generated, two concepts trained with prior preservation,
# merged in closed form, compressed, sampled, scored and exported; a DreamBooth model trained and its
# key/value delta extracted and merged; an InstantBooth encoder trained and a concept personalised
# with it. (`cdtool demo`, the one command left out, is `make demo`.)
set -euo pipefail
out=${1:-example-out}
rm -rf "$out"
mkdir -p "$out"
export CDTOOL_MODEL=tiny

# "Photos" of two concepts, as a phone would leave them: JPEGs with an EXIF rotation, a
# transparent PNG, a duplicate.
python - "$out" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image

root = Path(sys.argv[1])
for name, colour in (("cat", (200, 40, 40)), ("dog", (40, 160, 60))):
    folder = root / "photos" / name
    folder.mkdir(parents=True)
    for i in range(5):
        a = np.full((96, 96, 3), 200, np.uint8)
        o = 10 + 6 * i
        a[o : o + 48, o : o + 48] = colour
        a[o + 12 : o + 36 : 4, o : o + 48] = 255
        exif = Image.Exif()
        exif[0x0112] = 1 + 5 * (i % 2)  # every other one stored rotated
        Image.fromarray(a).save(folder / f"IMG_{i:04d}.jpg", exif=exif, quality=95)
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[20:76, 20:76] = (*colour, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    Image.open(folder / "IMG_0000.jpg").save(folder / "IMG_0000 copy.jpg", quality=95)
PY

cdtool prep "$out/photos/cat" -o "$out/data/cat" --class-noun cat --token "<new1>" --size 64 --dedupe
cdtool prep "$out/photos/dog" -o "$out/data/dog" --class-noun dog --token "<new2>" --size 64 --dedupe
cdtool regset cat -o "$out/reg/cat" --n 6 --steps 10 -q
cdtool regset dog -o "$out/reg/dog" --n 6 --steps 10 -q

cdtool train "$out/data/cat" --reg "$out/reg/cat" -o "$out/cat.safetensors" \
    --steps 40 --batch-size 2 --early-stop dvar --dvar-window 20
cdtool train "$out/data/dog" --reg "$out/reg/dog" -o "$out/dog.safetensors" --steps 40 --batch-size 2
cdtool merge "$out/cat.safetensors+$out/dog.safetensors" -o "$out/pets.safetensors"
cdtool compress "$out/pets.safetensors" -o "$out/pets.r4.safetensors" --rank 4
cdtool info "$out/pets.r4.safetensors"
cdtool sample "photo of a <new1> cat" "a <new1> cat next to a <new2> dog" --delta "$out/pets.r4.safetensors" \
    -o "$out/samples" --n 2 --steps 10 --grid
cdtool export "$out/pets.r4.safetensors" --to diffusers-lora -o "$out/pets-lora"
# DreamBooth as its paper trains it (every UNet weight, a whole model out), and the key/value delta
# get-deltas extracts from that model, merged with the Custom Diffusion concept.
cdtool train "$out/data/dog" --reg "$out/reg/dog" --method dreambooth -o "$out/dog-model" --steps 10 --batch-size 2 -q
cdtool info "$out/dog-model"
cdtool get-deltas "$out/dog-model" -o "$out/dog-kv.safetensors"
cdtool merge "$out/cat.safetensors+$out/dog-kv.safetensors" -o "$out/cat-dogmodel.safetensors" --method sum
# The built-in model is random, so the scores only show the plumbing: a tiny random CLIP stands in
# for ViT-B-32 (use the defaults with real weights on a real model).
cdtool score "$out/samples" --ref "$out/data/cat" --clip-model cdtool-tiny --clip-pretrained none \
    --metrics clip-t,clip-i,kid --kid-features clip --kid-subsets 10 --json > "$out/scores.json"
# InstantBooth: an encoder for the cat category, trained on the regularisation set's captioned cats
# (on a real model: thousands of them, for hours), then the cat photos personalised in one forward pass.
cdtool train-encoder "$out/reg/cat" --class-noun cat --backbone cdtool-tiny -o "$out/cat-encoder" \
    --steps 10 --batch-size 2 -q
cdtool personalize "$out/data/cat" --encoder "$out/cat-encoder" --token "<mittens>" -o "$out/mittens.safetensors"
cdtool sample "photo of a <mittens> cat" --delta "$out/mittens.safetensors" -o "$out/samples-instant" --n 2 --steps 10
echo "example finished: $out/samples/grid.png, $out/scores.json, training logs in $out/cat.run/" >&2
