"""The toy world and its oracle."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cdtool.toy.world import COLOURS, PATTERNS, Sampler, render


def test_scenes_are_seeded_and_captioned():
    a = [Sampler(random.Random(3)).scene() for _ in range(1)]
    b = [Sampler(random.Random(3)).scene() for _ in range(1)]
    assert a == b
    s = Sampler(random.Random(0))
    caps = [s.scene().caption() for _ in range(200)]
    assert all(c.endswith(" background") and " a a" not in c for c in caps)
    assert any(" and " in c for c in caps) and any(c.startswith(("a small", "a large")) for c in caps)
    assert not any(c.startswith("a orange") or " a orange" in c for c in caps)
    concept = Sampler(random.Random(1)).scene(count=1, concept="<new1>")
    assert concept.caption().startswith(("a small <new1> star", "a large <new1> star"))
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))


def test_patterns_render_both_tones():
    scene = Sampler(random.Random(2)).scene(count=1, concept="<new1>")
    px = np.asarray(render(scene, 64)).reshape(-1, 3).astype(int)
    for tone in PATTERNS["split"]:
        assert (np.abs(px - np.array(tone)).sum(1) < 30).sum() > 20
    plain = Sampler(random.Random(2)).scene(count=1)
    px = np.asarray(render(plain, 64)).reshape(-1, 3).astype(int)
    colour = np.array(COLOURS[plain.things[0].colour])
    assert (np.abs(px - colour).sum(1) < 30).sum() > 50


def test_oracle_reads_held_out_renders():
    from cdtool.toy.oracle import load_oracle, read

    try:
        oracle = load_oracle()
    except FileNotFoundError:
        pytest.fail("the oracle's weights are missing: run scripts/train_oracle.py")
    sampler = Sampler(random.Random(12345))
    scenes = [sampler.scene(pattern=list(PATTERNS)[i % 2] if i % 4 == 0 else None) for i in range(300)]
    seen = read(oracle, [render(s) for s in scenes])
    right = {"background": 0, "count": 0, "shapes": 0, "fills": 0}
    for scene, got in zip(scenes, seen, strict=True):
        right["background"] += got["background"] == scene.background
        right["count"] += got["count"] == len(scene.things)
        right["shapes"] += sorted(got["shapes"]) == sorted({t.shape for t in scene.things})
        right["fills"] += sorted(got["fills"]) == sorted({t.pattern or t.colour for t in scene.things})
    for head, n in right.items():
        assert n / len(scenes) >= 0.95, (head, n)
