"""The toy-model pretraining scripts run end to end (a few steps): a separately trained text encoder
over a compact vocabulary, a UNet re-read for its width on top of the shipped toy model, and both
resumed from their checkpoints where an uninterrupted run would have gone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(path: str, *args: object) -> None:
    cmd = [sys.executable, str(ROOT / path), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _text(out: Path, *extra: object) -> None:
    _script(
        "tools/pretrain_toy_text.py", "--width", 32, "--layers", 1, "--heads", 2, "--steps", 4, "--batch", 8,
        "--threads", 1, *extra, "--out", out,
    )  # fmt: skip


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text")
    _text(out)
    return out


def test_text_encoder_uses_a_compact_vocabulary(text_encoder):
    from transformers import CLIPTextModel, CLIPTokenizer

    from cdtool.models.clip_vocab import load_clip_tokenizer

    encoder = CLIPTextModel.from_pretrained(text_encoder, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(str(text_encoder / "tokenizer"))
    assert encoder.config.hidden_size == 32 and encoder.config.vocab_size == len(tokenizer) < 1000
    assert encoder.config.eos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id
    caption = "photo of a small red and white checkered triangle on an orange background"
    assert tokenizer.tokenize(caption) == load_clip_tokenizer().tokenize(caption)
    assert json.loads((text_encoder / "checkpoint.json").read_text())["step"] == 4


def test_a_resumed_text_encoder_continues_where_it_stopped(tmp_path, text_encoder):
    from safetensors.torch import load_file

    _text(tmp_path, "--until", 2)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2
    _script("tools/pretrain_toy_text.py", "--resume", tmp_path, "--threads", 1)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["step"] == 4 and meta["settings"]["width"] == 32
    whole = load_file(str(text_encoder / "checkpoint.safetensors"))
    resumed = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert whole.keys() == resumed.keys() and any(k.startswith("adam.") for k in whole)
    for k in whole:  # the same batches and optimiser state: on the CPU, bit for bit
        assert torch.equal(whole[k], resumed[k]), k
    _script("tools/resumable.py", "compact", tmp_path, tmp_path / "kept")
    kept = load_file(str(tmp_path / "kept" / "checkpoint.safetensors"))
    assert {v.dtype for k, v in kept.items() if k.startswith("adam.")} == {torch.bfloat16}
    assert {v.dtype for k, v in kept.items() if not k.startswith("adam.")} == {torch.float16}
    assert json.loads((tmp_path / "kept" / "checkpoint.json").read_text()) == meta


def test_unet_rereads_a_frozen_text_encoder_and_resumes(tmp_path, text_encoder):
    import shutil

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from cdtool.models.loading import toy_model_folder

    out, run = tmp_path / "model", tmp_path / "run"
    common = ("--threads", 1, "--minutes", 5, "--batch", 2, "--save-minutes", 60)
    # as a second text stage leaves it: the tokenizer saved by transformers (tokenizer.json), no vocab.json
    shutil.copytree(text_encoder, tmp_path / "text")
    text_encoder = tmp_path / "text"
    (text_encoder / "tokenizer" / "vocab.json").unlink()
    (text_encoder / "tokenizer" / "merges.txt").unlink()
    _script(
        "tools/pretrain_toy.py", "--init", toy_model_folder(), "--text-encoder", text_encoder, "--lr", 0.0,
        "--patterns", 1.0, "--world", "v2", "--until", 1, "--out", out, "--run", run, *common,
    )  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    shipped = UNet2DConditionModel.from_pretrained(toy_model_folder(), subfolder="unet")
    assert unet.config.cross_attention_dim == 32
    # only the cross-attention keys/values start afresh; at lr 0 every other weight is the shipped one
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert unet.get_submodule(f"{block}.to_k").weight.shape[1] == 32
    for name in ("conv_in.weight", f"{block}.to_q.weight", f"{block}.to_out.0.weight"):
        assert torch.equal(unet.state_dict()[name], shipped.state_dict()[name]), name
    encoder = CLIPTextModel.from_pretrained(text_encoder, subfolder="text_encoder")
    saved = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    assert torch.allclose(
        saved.get_input_embeddings().weight.float(), encoder.get_input_embeddings().weight.half().float()
    ), "the text encoder must stay frozen"
    _script("tools/pretrain_toy.py", "--resume", run, "--until", 2, *common)
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["n_averaged"] == 2 and meta["settings"]["world"] == "v2"
    assert json.loads((out / "pretraining.json").read_text())["unet_steps"] == meta["done_before"] + 2
    # as a repository keeps it: the compact copy, resumed on another machine with the folders it names moved
    _script("tools/resumable.py", "compact", run, tmp_path / "kept")
    text_encoder.rename(tmp_path / "moved-text")
    _script("tools/pretrain_toy.py", "--resume", tmp_path / "kept", "--text-encoder", tmp_path / "moved-text",
            "--out", tmp_path / "model2", "--until", 3, "--looks", 0.5, "--look-nouns", 0.25,
            "--look-pairs", 0.5, "--patterns", 0.6, "--pattern-pairs", 0.5, "--unbackgrounded", 0.3, *common)  # fmt: skip
    assert json.loads((tmp_path / "model2" / "pretraining.json").read_text())["unet_steps"] == meta["done_before"] + 3
    kept = json.loads((tmp_path / "kept" / "checkpoint.json").read_text())["settings"]
    assert kept["text_encoder"] == str(tmp_path / "moved-text") and kept["looks"] == 0.5  # a new stage of the run
    assert kept["look_nouns"] == 0.25 and kept["look_pairs"] == 0.5 and meta["settings"].get("look_nouns", 0.0) == 0.0
    assert meta["settings"].get("looks", 0.0) == 0.0 and meta["settings"]["patterns"] == 1.0
    assert kept["patterns"] == 0.6 and kept["pattern_pairs"] == 0.5 and meta["settings"]["pattern_pairs"] == 0.0
    assert kept["unbackgrounded"] == 0.3 and meta["settings"].get("unbackgrounded", 0.0) == 0.0
    _script("tools/pretrain_toy.py", "--resume", tmp_path / "kept", "--text-encoder", tmp_path / "moved-text",
            "--out", tmp_path / "model2", "--until", 4, "--patterns", 0, *common)  # fmt: skip
    kept = json.loads((tmp_path / "kept" / "checkpoint.json").read_text())["settings"]
    assert kept["patterns"] == 0.0 and kept["looks"] == 0.5  # a share given as 0 ends its stage; others stay


def test_a_second_text_stage_starts_from_the_first_with_the_identity_loss(tmp_path, text_encoder):
    from safetensors.torch import load_file

    _script(
        "tools/pretrain_toy_text.py", "--init", text_encoder, "--identity", 0.3, "--steps", 2, "--width", 32,
        "--layers", 1, "--heads", 2, "--batch", 8, "--threads", 1, "--out", tmp_path,
    )  # fmt: skip
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["settings"]["init"] == str(text_encoder) and meta["settings"]["identity"] == 0.3
    first = load_file(str(text_encoder / "checkpoint.safetensors"))
    second = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert "identity.weight" in second and not torch.equal(first["identity.weight"], second["identity.weight"])
    table = "text.embeddings.token_embedding.weight"
    assert (first[table] - second[table]).abs().max() < 0.01  # started from the first stage, not afresh


def test_delta_size_measures_the_relative_change_of_keys_and_values(tiny_pipe):
    """research/delta_size.py's measure on known changes: a layer's delta equal to its weight changes
    every row by 100 %, half of it by 50 %, and a delta without layers (textual inversion) by nothing."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    from research.delta_size import relative_change

    name = next(n for n, _ in tiny_pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    weight = tiny_pipe.unet.get_submodule(name).weight.detach()

    def delta(scale: float | None) -> SimpleNamespace:
        layers = {} if scale is None else {f"unet.{name}": SimpleNamespace(dense=lambda: scale * weight)}
        return SimpleNamespace(layers=layers, tokens=[])

    captions = ["a small red star on a blue background", "a cat"]
    for scale, expected in ((1.0, 1.0), (0.5, 0.5), (None, 0.0)):
        got = relative_change(tiny_pipe, delta(scale), captions)
        assert got == pytest.approx({"caption": expected, "padding": expected}, abs=1e-5), scale


def test_the_suites_oracle_trains_on_two_concepts_and_two_looks_in_one_image():
    """A prompt for two personal concepts is judged by reading both in one image: the oracle's
    training scenes hold such pairs (and pairs of other two-tone things)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import random

    from train_oracle import scenes_v2

    from cdtool.toy.world import Sampler

    scenes = scenes_v2(Sampler(random.Random(0)), 240)
    concept_pairs = [s for s in scenes if len(s.things) == 2 and all(t.concept for t in s.things)]
    look_pairs = [s for s in scenes if len(s.things) == 2 and all(t.look for t in s.things)]
    assert len(concept_pairs) == len(look_pairs) == 20
    assert len({(s.things[0].concept, s.things[1].concept) for s in concept_pairs}) > 10


def test_pair_accuracy_counts_scenes_whose_two_concepts_are_both_read():
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "tools"))
    from train_oracle import pair_accuracy

    model = SimpleNamespace(fill_names=["red", "new1", "new2", "pattern"], tokens={"<new1>": "new1", "<new2>": "new2"})
    fills = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]])  # three pairs, one single
    read = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    assert pair_accuracy(model, read, fills) == {"concept_pairs": pytest.approx(2 / 3)}
    assert pair_accuracy(model, read[2:3], fills[2:3]) == {}  # no pair to judge


def test_the_agreement_grid_shows_each_sample_with_both_verdicts(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from research.oracle_agreement import write_grid

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    verdicts = [[{"concept": True}, {"concept": False}, {}], [{"concept": True}, {"concept": True}, {}]]
    write_grid(tmp_path / "g" / "s.png", images, verdicts, cols=2)
    grid = Image.open(tmp_path / "g" / "s.png").convert("RGB")
    assert grid.size == (256, 2 * (128 + 14))
    assert grid.getpixel((200, 60)) == (0, 0, 255) and grid.getpixel((60, 200)) == (0, 128, 0)  # enlarged in place


def _text_module():
    sys.path.insert(0, str(ROOT / "tools"))
    import pretrain_toy_text

    return pretrain_toy_text


def test_rare_names_go_before_the_first_noun_and_shift_the_caption(text_encoder):
    mod = _text_module()
    tok = mod.toy_tokenizer(text_encoder / "tokenizer")
    captions = ["a small red star and a blue circle on a green background", "a circle on a red background"]
    ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = mod.with_rare_names(ids, tok, 1.0, torch.Generator().manual_seed(0))
    for before, after in zip(ids, out, strict=True):
        noun = int(
            torch.isin(before, torch.tensor(tok.convert_tokens_to_ids(["star</w>", "circle</w>"]))).int().argmax()
        )
        assert torch.equal(after[:noun], before[:noun]) and torch.equal(after[noun + 1 :], before[noun:-1])
        assert int(after[noun]) not in (tok.bos_token_id, tok.eos_token_id)
    assert torch.equal(mod.with_rare_names(ids, tok, 0.0, torch.Generator().manual_seed(0)), ids)


def test_kept_rows_loss_is_zero_for_the_teacher_itself_and_grows_as_rows_move(text_encoder):
    from transformers import CLIPTextModel

    mod = _text_module()
    tok = mod.toy_tokenizer(text_encoder / "tokenizer")
    teacher = CLIPTextModel.from_pretrained(str(text_encoder / "text_encoder")).eval()
    student = CLIPTextModel.from_pretrained(str(text_encoder / "text_encoder")).eval()
    ids = tok(["a red star on a blue background"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert float(mod.kept_rows_loss(student, ids, teacher, ids)) < 1e-10
    with torch.no_grad():
        student.final_layer_norm.bias += 1.0  # every row moves by one in each feature
    want = teacher(ids)[0]
    expected = 1.0 / float(want.pow(2).mean())
    assert float(mod.kept_rows_loss(student, ids, teacher, ids)) == pytest.approx(expected, rel=1e-4)


class _Vocab:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_a_grown_table_carries_each_kept_entry_s_row_to_its_new_place():
    mod = _text_module()
    old = torch.arange(6.0).reshape(3, 2)  # rows of a=0, b=1, c=2
    start = {"text.embeddings.token_embedding.weight": old}
    fresh = torch.full((4, 2), -1.0)
    mod.grown_table(start, {"a": 0, "b": 1, "c": 2}, _Vocab({"b": 0, "new": 1, "a": 2, "c": 3}), fresh)
    table = start["text.embeddings.token_embedding.weight"]
    assert torch.equal(table, torch.tensor([[2.0, 3.0], [-1.0, -1.0], [0.0, 1.0], [4.0, 5.0]]))


def test_a_tokenizer_without_the_look_words_needs_growth(tmp_path, text_encoder):
    from cdtool.models.clip_vocab import compact_vocab_and_merges, write_tokenizer
    from cdtool.models.tokens import DEFAULT_INIT
    from cdtool.toy.world import LOOKS, caption_words

    mod = _text_module()
    assert not mod.needs_growth(text_encoder / "tokenizer")
    write_tokenizer(tmp_path, *compact_vocab_and_merges(set(caption_words()) - set(LOOKS), DEFAULT_INIT))
    assert mod.needs_growth(tmp_path)


def test_a_text_stage_with_rare_names_and_looks_keeps_a_teachers_rows(tmp_path, text_encoder):
    _script(
        "tools/pretrain_toy_text.py", "--init", text_encoder, "--identity", 0.3, "--rare", 0.5, "--looks", 0.5,
        "--keep-from", text_encoder, "--keep", 5, "--steps", 2, "--width", 32, "--layers", 1, "--heads", 2,
        "--batch", 8, "--threads", 1, "--out", tmp_path,
    )  # fmt: skip
    settings = json.loads((tmp_path / "checkpoint.json").read_text())["settings"]
    assert settings["rare"] == 0.5 and settings["looks"] == 0.5
    assert settings["keep"] == 5 and settings["keep_from"] == str(text_encoder)


def test_calibration_agreement_counts_each_eye_label_apart():
    sys.path.insert(0, str(ROOT))
    from research.judge_calibration import agreement

    got = agreement([True, True, False, True, False, False, True, False], ["Y", "Y", "Y", "n", "n", "n", "?", "?"])
    assert got == pytest.approx(
        {"recall": 2 / 3, "false": 1 / 3, "unsure": 1 / 2, "fidelity": 4 / 8, "eye_low": 3 / 8, "eye_high": 5 / 8}
    )


def test_a_packed_calibration_set_gives_back_each_sample_pixel_for_pixel_with_its_prompt_and_label(tmp_path):
    import random

    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from research.judge_calibration import load_set, pack

    folder = tmp_path / "samples" / "new3-square"
    folder.mkdir(parents=True)
    rng, prompts, originals = random.Random(0), {}, []
    for i in range(20):  # more than one row of tiles, each with its own noise
        image = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3)))
        image.save(folder / f"{i:02d}.png")
        prompts[f"{i:02d}.png"] = f"a small <new3> square, sample {i}"
        originals.append(image)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    labels = {f"new3-square/{i}": "Y?n"[i % 3] for i in reversed(range(1, 20))}
    assert pack(tmp_path / "samples", labels, tmp_path / "set") == 19
    tiles, rows = load_set(tmp_path / "set")
    assert [r["index"] for r in rows] == list(range(1, 20))
    assert [r["eye"] for r in rows] == ["Y?n"[i % 3] for i in range(1, 20)]
    assert all(r["prompt"].endswith(f"sample {r['index']}") for r in rows)
    assert all(t.tobytes() == originals[r["index"]].tobytes() for t, r in zip(tiles, rows, strict=True))
    with pytest.raises(ValueError, match="not one of"):
        pack(tmp_path / "samples", {"new3-square/1": "maybe"}, tmp_path / "bad")
    originals[0].resize((64, 64)).save(folder / "00.png")
    with pytest.raises(ValueError, match="not 32 px"):
        pack(tmp_path / "samples", {"new3-square/0": "Y"}, tmp_path / "bad")


def test_the_suites_judge_agrees_with_samples_read_by_eye():
    """The judge of the suite's benchmark, on 448 of its samples read by eye: it finds most clear
    concepts and reads few clear misses as the concept (research/judge_calibration.py)."""
    sys.path.insert(0, str(ROOT))
    from cdtool.toy.oracle import shipped_weights
    from research.judge_calibration import agreement, concept_verdicts, load_set

    tiles, rows = load_set()
    got = agreement(concept_verdicts(shipped_weights(), tiles, rows), [r["eye"] for r in rows])
    assert got["recall"] >= 0.8 and got["false"] <= 0.1, got


def test_near_misses_of_a_concept_are_read_as_another_pattern_and_own_tones_as_the_concept():
    """A concept's near misses (tones swapped, sometimes on a background in one of them, or one tone
    replaced; with `missing`, sometimes by the background's colour: a band missing) are labelled
    `pattern`; the concept on a background in one of its own tones is labelled the concept (a right
    render whose band merges into the background)."""
    import random

    from cdtool.toy.oracle import fill_of
    from cdtool.toy.world import SUITE, Sampler, suite_concept

    sampler = Sampler(random.Random(0))
    for concept in SUITE:
        scenes = [sampler.near_miss(concept, any_shape=k % 2 == 1) for k in range(40)]
        misses = [s.things[0] for s in scenes]
        assert {fill_of(t) for t in misses} == {"pattern"}
        assert all(t.pattern == concept.kind and t.pair != concept.tones for t in misses)
        swapped = [t for t in misses if t.pair == concept.tones[::-1]]
        assert (concept.kind == "checker") == (not swapped)  # a checker's swap is its mirror image
        # a split's one visible half could be either half: its swap never stands on one of its tones
        own_tone_swaps = [
            s for s in scenes if s.things[0].pair == concept.tones[::-1] and s.background in concept.tones
        ]
        assert (concept.kind == "split") == (not own_tone_swaps) or concept.kind == "checker"
        own = sampler.on_own_tone(concept)
        assert fill_of(own.things[0]) == concept.fill
    assert {sampler.on_own_tone(suite_concept("<new3>")).background for _ in range(20)} == {"yellow", "blue"}
    stripes = [sampler.near_miss(suite_concept("<new3>")) for _ in range(80)]
    assert {s.background for s in stripes if s.things[0].pair == ("blue", "yellow")} > {"blue", "yellow"}
    assert all(s.background not in s.things[0].pair for s in stripes if s.things[0].pair != ("blue", "yellow"))
    blank = [sampler.near_miss(suite_concept("<new3>"), missing=True) for _ in range(80)]
    assert any(s.background in s.things[0].pair and s.things[0].pair != ("blue", "yellow") for s in blank)


def test_the_oracles_near_miss_scenes_take_their_turns_among_the_others():
    sys.path.insert(0, str(ROOT / "tools"))
    import random

    from train_oracle import scenes_v2

    from cdtool.toy.oracle import fill_of
    from cdtool.toy.world import SUITE, Sampler

    scenes = scenes_v2(Sampler(random.Random(0)), 192, near_misses=True)
    misses, own = scenes[2::12], scenes[8::12]
    assert {fill_of(s.things[0]) for s in misses} == {"pattern"}
    assert [fill_of(s.things[0]) for s in own] == [c.fill for c in SUITE] * 2
    assert all(s.background in c.tones for s, c in zip(own, SUITE * 2, strict=True) if c.tones[0] != "magenta")
    plain = scenes_v2(Sampler(random.Random(0)), 192)
    assert [s.caption() for s in plain[:2]] == [s.caption() for s in scenes[:2]]  # the same stream until then


def test_swapped_tones_swap_a_two_tone_things_colours_and_nothing_else():
    mod = _text_module()
    assert mod.swapped_tones("photo of a small yellow and blue striped square on a red background") == (
        "photo of a small blue and yellow striped square on a red background"
    )
    assert mod.swapped_tones("a red and green checkered star and a blue circle on a white background") == (
        "a green and red checkered star and a blue circle on a white background"
    )
    assert mod.swapped_tones("a red star and a blue circle on a white background") is None
    assert mod.swapped_tones("a small tiger square on a blue background") is None


def test_role_labels_mark_first_and_second_tones_and_plain_colours(text_encoder):
    mod = _text_module()
    tok = mod.toy_tokenizer(text_encoder / "tokenizer")
    captions = [
        "a small yellow and blue striped square on a red background",
        "a red star and a blue circle on a green background",
    ]
    ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    labels = mod.role_labels(ids, tok)
    for i, caption in enumerate(captions):
        marked = {
            tok.convert_ids_to_tokens(int(t)).removesuffix("</w>"): int(r)
            for t, r in zip(ids[i], labels[i], strict=True)
            if r >= 0
        }
        want = {"yellow": 1, "blue": 2, "red": 0} if i == 0 else {"red": 0, "blue": 0, "green": 0}
        assert marked == want, caption
    assert int((labels >= 0).sum()) == 6


def test_role_loss_falls_when_the_rows_carry_the_roles():
    mod = _text_module()
    head = torch.nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(10 * torch.eye(3))
        head.bias.zero_()
    labels = torch.tensor([[0, 1, 2, -100]])
    ids = torch.zeros(1, 4, dtype=torch.long)
    telling = torch.eye(3)[[0, 1, 2, 0]][None]
    blind = torch.ones(1, 4, 3)
    with torch.no_grad():
        assert float(mod.role_loss(telling, ids, labels, head)) < 1e-3
        assert float(mod.role_loss(blind, ids, labels, head)) == pytest.approx(
            float(torch.log(torch.tensor(3.0))), rel=1e-5
        )


def test_a_text_stage_with_order_negatives_and_roles_saves_the_role_head(tmp_path, text_encoder):
    _script(
        "tools/pretrain_toy_text.py", "--init", text_encoder, "--identity", 0.3, "--order-negatives", "--roles", 0.3,
        "--keep-from", text_encoder, "--keep", 5, "--steps", 2, "--width", 32, "--layers", 1, "--heads", 2,
        "--batch", 16, "--threads", 1, "--out", tmp_path,
    )  # fmt: skip
    from safetensors import safe_open

    settings = json.loads((tmp_path / "checkpoint.json").read_text())["settings"]
    assert settings["order_negatives"] is True and settings["roles"] == 0.3
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert "roles.weight" in set(f.keys())


def test_a_logistic_probe_separates_what_is_separable_in_the_datas_own_units():
    sys.path.insert(0, str(ROOT / "research"))
    from eval_toy import fit_logistic

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 100.0, 1.0, 1.0, 0.01]) + 50
    y = (x[:, 4] > 50).long()  # told by a feature a hundredth the scale of the others
    w, b = fit_logistic(x, y)
    assert float((((x @ w + b) > 0).long() == y).float().mean()) > 0.95


class _RowsOfTokens:
    """A stand-in text encoder: each row is its token's one-hot; with `roles`, a second tone's row (a
    colour after "<colour> and") also carries a feature of its own."""

    def __init__(self, tok, roles: bool) -> None:
        from cdtool.toy.world import COLOURS

        self.colours = torch.tensor(tok.convert_tokens_to_ids([f"{c}</w>" for c in COLOURS]))
        self.and_id, self.width, self.roles = tok.convert_tokens_to_ids("and</w>"), len(tok) + 1, roles

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        rows = torch.nn.functional.one_hot(ids, self.width).float()
        if self.roles:
            second = (
                torch.isin(ids[:, 2:], self.colours)
                & (ids[:, 1:-1] == self.and_id)
                & torch.isin(ids[:, :-2], self.colours)
            )
            rows[:, 2:, -1] = 3.0 * second
        return (rows,)


def test_the_tone_order_report_tells_rows_that_carry_the_role_from_rows_that_do_not(text_encoder):
    sys.path.insert(0, str(ROOT / "research"))
    from eval_toy import tone_order, tone_rows

    tok = _text_module().toy_tokenizer(text_encoder / "tokenizer")
    rows, roles, words, places = tone_rows(tok, _RowsOfTokens(tok, roles=False))
    assert rows.shape[0] == 2 * 8 * 7 * 4 and roles.tolist()[:4] == [0, 1, 0, 1] and words[:2] == ["red", "green"]
    assert torch.equal(places[1::2], places[0::2] + 2)
    blind = tone_order(tok, _RowsOfTokens(tok, roles=False))
    assert blind["first_vs_second_cosine"]["min"] == pytest.approx(1.0)
    assert blind["the_same_at_shared_positions"] <= 0.6  # identical rows: no probe can read the role
    telling = tone_order(tok, _RowsOfTokens(tok, roles=True))
    assert telling["first_vs_second_cosine"]["max"] < 0.9
    assert telling["probe_accuracy_on_held_out_colours"] == 1.0 and telling["the_same_at_shared_positions"] == 1.0


def test_the_suites_judge_reads_clean_renders_and_the_swap_readings_are_shares():
    from cdtool.toy.oracle import shipped_weights
    from research.judge_calibration import swap_readings

    shares = swap_readings(shipped_weights(), n=8)
    assert len(shares) == 8 and all(r["right"] == 1.0 for r in shares.values())
    assert all(r["swapped"] == 0.0 for r in shares.values() if r["kind"] in ("dotted", "checker"))


def _research(name: str):
    sys.path.insert(0, str(ROOT / "research"))
    return __import__(name)


def test_concept_words_prompts_are_worded_as_the_world_captions_its_scenes():
    from cdtool.toy.world import PAIRS, Scene, Thing, suite_concept

    mod = _research("concept_words")

    def background(prompt: str) -> str:
        return prompt.removesuffix(" background").rsplit(" ", 1)[1]

    for tokens in PAIRS[1:]:  # the first pair's split star has tones no caption names
        first, second = map(suite_concept, tokens)
        things = tuple(
            Thing(c.shape, "red", "small", x, 0.5, pattern=c.kind, pair=c.tones)
            for c, x in ((first, 0.28), (second, 0.72))
        )
        asked = mod.pair_prompts(first, second, 12)
        assert all(p == Scene(things, background(p)).caption() for p in asked)
        assert not {background(p) for p in asked} & {*first.tones, *second.tones}
        assert len({background(p) for p in asked}) > 1  # backgrounds in turn
        alone = mod.prompts(first, first.tones, 8)
        assert all(p == Scene(things[:1], background(p)).caption() for p in alone)  # "an orange background"


def test_the_attention_recorder_records_what_the_layer_computes(tiny_pipe):
    """research/attention_rows.py's Recorder: the attention each text row receives, averaged over
    pixels and heads, equals softmax(q kᵀ · scale) computed by hand from the layer's own weights, and
    the layer's output is the wrapped processor's."""
    from diffusers.models.attention_processor import AttnProcessor

    sys.path.insert(0, str(ROOT))
    from research.attention_rows import Recorder

    attn = next(m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2"))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    text = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    sink: list[torch.Tensor] = []
    with torch.no_grad():
        out = Recorder(AttnProcessor(), sink)(attn, pixels, text)
        q = attn.to_q(pixels).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # [b, heads, pixels, d]
        k = attn.to_k(text).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        assert torch.allclose(out, AttnProcessor()(attn, pixels, text), atol=1e-6)
    assert len(sink) == 1 and torch.allclose(sink[0], probs.mean(2).mean(1), atol=1e-6)
    assert not torch.allclose(sink[0], torch.full_like(sink[0], 1 / 77), atol=1e-4)  # keys that matter


def test_attention_shares_sum_to_one_and_uniform_attention_gives_each_row_its_count(fresh_tiny):
    """research/attention_rows.py's bookkeeping on known attention: with every key zero each pixel
    attends to the 77 rows alike, so a part's share is its number of rows over 77; word pieces are
    labelled by the word they belong to."""
    sys.path.insert(0, str(ROOT))
    from research.attention_rows import attention_shares, roles

    for name, module in fresh_tiny.unet.named_modules():
        if name.endswith("attn2.to_k"):
            torch.nn.init.zeros_(module.weight)
    prompt = "a small red star on a blue background"
    got = attention_shares(fresh_tiny, [prompt], steps=2, token=None)
    n_words = len(fresh_tiny.tokenizer(prompt).input_ids) - 2
    assert sum(got["share"].values()) == pytest.approx(1.0, abs=1e-4)
    assert got["share"]["start-of-text"] == pytest.approx(1 / 77, abs=1e-4)
    assert got["share"]["padding"] == pytest.approx((77 - n_words - 2) / 77, abs=1e-4)
    assert all(v == pytest.approx(1 / 77, abs=1e-5) for v in got["per_row"].values())
    pieces = fresh_tiny.tokenizer.tokenize(
        "a small cyan and magenta checkered square and a red star on a red background"
    )
    assert pieces[2:4] == ["cy", "an</w>"]  # a tone split into pieces is still a tone
    tones, nouns = {"cyan", "magenta", "checkered", "red"}, {"square", "star"}
    assert roles(pieces, None, nouns, tones) == [
        "other word", "other word", *["colour or look"] * 6, "class noun",  # "and" between two tones
        "other word", "other word", "colour or look", "class noun", *["background phrase"] * 4,  # "and" between things
    ]  # fmt: skip


# The first 16 hex digits of the sha256 of pretrain_toy's batch(Sampler(Random(4)), 64, views=True)
# captions, joined by newlines, as every run before the --unbackgrounded stage drew them.
PLAIN_CAPTIONS_SEED_4 = "f87e3aa3b4c10fb9"


def test_a_caption_stage_without_backgrounds_leaves_them_out_and_keeps_the_stream_when_off():
    """pretrain_toy's --unbackgrounded: that share of captions ends at the things ("a small red star");
    at 0 no random number is drawn for it, so a run without the stage keeps its data stream."""
    import hashlib
    import random

    sys.path.insert(0, str(ROOT / "tools"))
    from pretrain_toy import batch

    from cdtool.toy.world import Sampler

    _, plain = batch(Sampler(random.Random(4)), 64, views=True)
    # the stream as it was before the stage existed (a hash of these captions, pinned)
    assert all(c.endswith(" background") for c in plain)
    assert hashlib.sha256("\n".join(plain).encode()).hexdigest()[:16] == PLAIN_CAPTIONS_SEED_4
    _, drawn = batch(Sampler(random.Random(4)), 64, views=True, unbackgrounded=1e-9)
    assert drawn != plain and all(c.endswith(" background") for c in drawn)  # drawing shifts the stream
    _, some = batch(Sampler(random.Random(4)), 64, views=True, unbackgrounded=0.5)
    left_out = [c for c in some if not c.endswith(" background")]
    assert 16 <= len(left_out) <= 48 and not any(" on " in c for c in left_out)


def test_output_change_is_zero_for_no_change_and_one_when_the_values_double(fresh_tiny):
    """research/delta_size.py's through-attention measure: a delta adding each value weight to itself
    (keys unchanged, so attention is the same) doubles every cross-attention layer's output (its
    output bias zeroed), a change of 100 %; no change is 0; the weights are restored afterwards."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    from research.delta_size import output_change

    unet = fresh_tiny.unet
    values = {n: m.weight for n, m in unet.named_modules() if n.endswith("attn2.to_v")}
    for n in values:
        torch.nn.init.zeros_(unet.get_submodule(n.replace("to_v", "to_out.0")).bias)
    before = {n: w.detach().clone() for n, w in values.items()}

    def delta(scale: float) -> SimpleNamespace:
        return SimpleNamespace(
            layers={f"unet.{n}": SimpleNamespace(dense=lambda w=w: scale * w.detach()) for n, w in values.items()}
        )

    captions = ["a small red star on a blue background", "a cat"]
    assert output_change(fresh_tiny, delta(1.0), captions, steps=2) == pytest.approx(1.0, abs=1e-4)
    assert output_change(fresh_tiny, delta(0.0), captions, steps=2) == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(w, before[n]) for n, w in values.items())
