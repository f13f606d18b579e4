"""Writes cdtool/data/reg_captions.txt: varied captions written for cdtool (people, animals,
objects, scenes, styles), used as the regularisation set of the closed-form merge.

Deterministic: rerunning gives the same file. `python tools/make_reg_captions.py`
"""

from __future__ import annotations

import random
from pathlib import Path

PEOPLE = [
    "a young woman",
    "an old man",
    "a child",
    "a chef",
    "a firefighter",
    "two friends",
    "a surfer",
    "a ballet dancer",
    "a street musician",
    "a farmer",
    "a scientist",
    "a teenage boy",
    "a grandmother",
    "a cyclist",
    "a painter",
    "a group of hikers",
    "a bride",
    "a soldier in uniform",
    "a jazz singer",
    "a fisherman",
    "a nurse",
    "a skateboarder",
    "a family of four",
    "a knight in armor",
    "an astronaut",
]
ANIMALS = [
    "a tabby cat",
    "a golden retriever",
    "a red fox",
    "a herd of elephants",
    "a barn owl",
    "a horse",
    "a small puppy",
    "a koala",
    "a flock of pigeons",
    "a brown bear",
    "a goldfish",
    "a tiger",
    "a pair of swans",
    "a lizard",
    "a dolphin",
    "a sheep",
    "a parrot",
    "a rabbit",
    "a giraffe",
    "a hedgehog",
    "a penguin",
    "a cow",
    "a butterfly",
    "a wolf",
    "a sea turtle",
]
OBJECTS = [
    "a red bicycle",
    "a wooden chair",
    "a ceramic vase",
    "a vintage camera",
    "a leather backpack",
    "a cup of coffee",
    "a stack of books",
    "a teddy bear",
    "an old clock",
    "a pair of sneakers",
    "a guitar",
    "a bowl of fruit",
    "a glass bottle",
    "a table lamp",
    "a sports car",
    "a sailboat",
    "a toy robot",
    "a birthday cake",
    "a laptop",
    "a straw hat",
    "a wooden barn",
    "a lighthouse",
    "a pair of sunglasses",
    "a potted plant",
    "a teapot",
]
PLACES = [
    "on a sunny beach",
    "in a snowy forest",
    "in a busy city street",
    "in a quiet library",
    "on a mountain top",
    "in a kitchen",
    "at a night market",
    "in a wheat field",
    "under a bridge",
    "in a living room",
    "on a wooden table",
    "in the desert",
    "by a lake at dawn",
    "in a subway station",
    "in a flower garden",
    "on a rainy sidewalk",
    "in an empty classroom",
    "at a train station",
    "in a greenhouse",
    "on a rooftop at sunset",
    "in a cave",
    "near a waterfall",
    "in a cozy cafe",
    "on the moon",
    "in a medieval castle",
]
ACTIONS = [
    "sitting",
    "running",
    "sleeping",
    "looking at the camera",
    "standing",
    "jumping",
    "reading",
    "walking slowly",
    "resting",
    "playing",
    "waiting",
    "smiling",
]
STYLES = [
    "a photo of",
    "an oil painting of",
    "a watercolor of",
    "a pencil sketch of",
    "a close-up photo of",
    "a wide shot of",
    "a black and white photo of",
    "a digital illustration of",
    "a cartoon of",
    "a vintage postcard of",
    "a low-poly render of",
    "a mosaic of",
    "an ink drawing of",
    "a blurry photo of",
    "an aerial view of",
    "a macro shot of",
]
SCENES = [
    "a foggy harbor with fishing boats",
    "a crowded market in the morning",
    "a mountain lake under stars",
    "an abandoned factory",
    "a field of sunflowers",
    "a narrow alley with lanterns",
    "a snow-covered village",
    "a tropical island",
    "a thunderstorm over the plains",
    "a quiet suburban street",
    "a bamboo forest",
    "a canyon at sunset",
    "a modern glass skyscraper",
    "an old stone bridge",
    "a frozen river",
    "a busy airport terminal",
    "a vineyard in autumn",
    "a coral reef",
    "a city skyline at night",
    "a country road in spring",
]
ART = [
    "in the style of impressionism",
    "in the style of ukiyo-e",
    "in a cubist style",
    "in pixel art style",
    "as a pop art poster",
    "in art nouveau style",
    "as a stained glass window",
    "in the style of a comic book",
    "in a minimalist style",
    "in the style of baroque painting",
]


def captions(seed: int = 0, n: int = 1200) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    subjects = PEOPLE + ANIMALS
    while len(out) < n:
        kind = rng.random()
        if kind < 0.35:
            s = f"{rng.choice(STYLES)} {rng.choice(subjects)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
        elif kind < 0.6:
            s = f"{rng.choice(STYLES)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        elif kind < 0.75:
            s = f"{rng.choice(STYLES)} {rng.choice(SCENES)}"
        elif kind < 0.9:
            s = f"{rng.choice(subjects + OBJECTS)} {rng.choice(ART)}"
        else:
            s = f"{rng.choice(SCENES)} {rng.choice(ART)}"
        out.add(s)
    return sorted(out)


if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "cdtool" / "data" / "reg_captions.txt"
    path.write_text("\n".join(captions()) + "\n")
    print(path)
