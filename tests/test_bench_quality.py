"""benchmarks/quality.py's reading of its cells (the benchmark itself runs in tests/test_toy_model.py)."""

from __future__ import annotations

from benchmarks import quality


def test_small_cells_are_read_against_the_full_delta_at_their_own_seeds(monkeypatch, tmp_path):
    """A compression cell samples one seed per prompt; the full delta's fidelity it is read against
    is the one at that seed, not over all of the full delta's seeds."""

    s = quality.Settings(n=32, n_small=8, seed=0)
    assert quality.small_cell_seeds(s) == {0}
    assert quality.small_cell_seeds(quality.Settings(n_small=32, seed=5)) == {5, 6, 7, 8}
    assert quality.seed_of("003-a-small-new2-circle-on-a-red-background-ab12-s13.png") == 13

    b = quality.Bench(tmp_path, s, quiet=True)
    prompts = b.groups["concept <new2>"]
    # the concept shows at seed 0 on every prompt and at no other seed
    images = [
        {"file": f"{i:03d}-x-s{k}.png", "prompt": p, "oracle": {"concept": k == 0, "pattern": k == 0}}
        for i, p in enumerate(prompts)
        for k in range(4)
    ]
    monkeypatch.setattr(b, "run", lambda *a, **kw: {"runs": [{"images": images}]})
    cell = b.judge("new2-circle", ["concept <new2>"])["concept <new2>"]
    assert cell["concept_fidelity"] == 0.25
    assert cell["concept_fidelity_small_seeds"] == 1.0
