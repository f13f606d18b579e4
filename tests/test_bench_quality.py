"""benchmarks/quality.py's reading of its cells (the benchmark itself runs in tests/test_toy_model.py)."""

from __future__ import annotations

import pytest

from benchmarks import quality


def test_small_cells_are_read_against_the_full_delta_at_their_own_seeds(monkeypatch, tmp_path):
    """A compression cell samples one seed per prompt; the full delta's fidelity it is read against
    is the one at that seed, not over all of the full delta's seeds."""

    s = quality.Settings(n=32, n_small=8, seed=0, suite=False)
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
    assert cell["concept_by_seed"] == {"0": 1.0, "1": 0.0, "2": 0.0, "3": 0.0}


def test_clustered_standard_error_is_the_spread_of_cluster_means():
    import math
    import random
    import statistics

    # clusters that agree carry no sampling error between them
    assert quality.clustered_standard_error([0.5, 0.5, 0.5]) == 0.0
    assert math.isnan(quality.clustered_standard_error([0.3]))
    means = [0.875, 0.0, 0.375, 0.25]
    direct = math.sqrt(sum((m - statistics.fmean(means)) ** 2 for m in means) / 3 / 4)
    assert math.isclose(quality.clustered_standard_error(means), direct)
    # independent samples in clusters of 8: close to the binomial standard error of all of them
    rng = random.Random(0)
    p, k = 0.4, 400
    clusters = [sum(rng.random() < p for _ in range(8)) / 8 for _ in range(k)]
    binomial = math.sqrt(p * (1 - p) / (8 * k))
    assert abs(quality.clustered_standard_error(clusters) / binomial - 1) < 0.1
    # a shared cluster effect (a seed where the concept shows on every prompt, or on none) widens it
    shared = [float(rng.random() < p) for _ in range(k)]
    assert quality.clustered_standard_error(shared) > 2.5 * binomial


def test_a_suite_concepts_own_tone_backgrounds_are_read_apart(monkeypatch, tmp_path):
    s = quality.Settings(n=32, n_small=8, suite=True)
    own = quality.own_tone_prompts(s)
    assert own["<new4>"] == {"a small <new4> heart on a red background", "a small <new4> heart on a white background"}
    assert own["<new1>"] == set()  # magenta and cyan are no background
    assert quality.own_tone_prompts(quality.Settings(suite=False)) == {}

    b = quality.Bench(tmp_path, s, quiet=True)
    prompts = b.groups["concept <new4>"]
    # drawn on every background but its own two tones
    images = [
        {"file": f"{i:03d}-x-s0.png", "prompt": p, "oracle": {"concept": p not in own["<new4>"]}}
        for i, p in enumerate(prompts)
    ]
    monkeypatch.setattr(b, "run", lambda *a, **kw: {"runs": [{"images": images}]})
    cell = b.judge("dotted-heart", ["concept <new4>"])["concept <new4>"]
    assert cell["concept_fidelity"] == 0.75
    assert cell["concept_fidelity_own_tones"] == 0.0
    assert cell["concept_fidelity_other_backgrounds"] == 1.0


def test_suite_pairs_choose_the_concepts_and_their_prompts():
    s = quality.Settings(suite=True, pairs=(2, 4))
    assert [c[0] for c in quality.concepts_of(s)] == ["<new3>", "<new4>", "<new7>", "<new8>"]
    assert [tuple(c[0] for c in p) for p in quality.pairs_of(s)] == [("<new3>", "<new4>"), ("<new7>", "<new8>")]
    groups = quality.prompt_groups(s)
    assert "concept <new3>" in groups and "concept <new1>" not in groups
    assert sorted(g for g in groups if g.startswith("both")) == ["both-new3+new4", "both-new7+new8"]
    every = quality.Settings(suite=True)
    assert len(quality.concepts_of(every)) == 8 and len(quality.pairs_of(every)) == 4


def test_a_longer_schedule_reads_its_curve_at_the_same_fractions_and_ranks_0_skips_compression():
    ap = quality.parser()
    s = quality.settings_from(ap.parse_args(["--suite", "--steps", "500", "--ranks", "0", "--photos", "10"]), ap)
    assert s.steps == 500 and s.joint_steps == 1000 and s.curve_steps == (100, 200, 250)
    assert s.ranks == () and s.photos == 10 and s.lr == quality.SUITE_LR and s.captions == "files"
    default = quality.settings_from(ap.parse_args([]), ap)
    assert default.curve_steps == (50, 100, 125) and default.ranks == (1, 2, 4, 8) and default.lr == quality.SUITE_LR
    assert default.suite and default.pairs == () and default.model == "toy"


def test_v1_runs_the_v1_worlds_two_concepts_at_its_rate():
    ap = quality.parser()
    v1 = quality.settings_from(ap.parse_args(["--v1"]), ap)
    assert not v1.suite and v1.lr == quality.V1_LR and (v1.model, v1.oracle) == (quality.V1_MODEL, quality.V1_ORACLE)
    assert [c[0] for c in quality.concepts_of(v1)] == ["<new1>", "<new2>"] and quality.pair_tag(v1, ("a", "b")) == ""
    from pathlib import Path

    assert (Path(v1.model) / "model_index.json").is_file() and Path(v1.oracle).is_file()
    other = quality.settings_from(ap.parse_args(["--v1", "--model", "M", "--oracle", "O", "--lr", "1e-4"]), ap)
    assert (other.model, other.oracle, other.lr) == ("M", "O", 1e-4)
    ci = quality.settings_from(ap.parse_args(["--ci"]), ap)
    assert ci.suite and ci.pairs == (quality.CI_PAIR,) and len(quality.concepts_of(ci)) == 2 and ci.model == "toy"
    v1_ci = quality.settings_from(ap.parse_args(["--ci", "--v1"]), ap)
    assert not v1_ci.pairs and v1_ci.photos == 5 and "noreg" in v1_ci.variants and v1_ci.model == quality.V1_MODEL
    for bad in (["--v1", "--suite"], ["--v1", "--pairs", "2"]):
        with pytest.raises(SystemExit) as e:
            quality.settings_from(ap.parse_args(bad), ap)
        assert e.value.code == 2
