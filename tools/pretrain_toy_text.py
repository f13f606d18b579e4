"""Pretrains a toy text encoder alone, as CLIP was trained: contrastively against images.

    python tools/pretrain_toy_text.py --out toy2-text --minutes 60 [--resume toy2-text]

Stable Diffusion's UNet was trained on a frozen CLIP text encoder that had learned from images
before; the shipped toy model's UNet is trained the same way (`pretrain_toy.py --text-encoder DIR`). A
text encoder trained together with the UNet (the v1 toy model's) learns to pack the prompt into the
padding rows after end-of-text, each of them differently, and its UNet reads it there: rows the
paper's closed-form merge does not constrain (measured in benchmarks/RESULTS.md). In Stable
Diffusion the padding is the end-of-text token again, which CLIP trained as the caption's summary
at whatever position a caption ended, so its padding rows are summaries much like the end-of-text
row the merge does constrain. Here the contrastive loss is taken at the end-of-text row and at one
random padding row of each caption, so every position past the caption learns to be that summary.

Text side: a CLIPTextModel (`--width`, `--layers`) over a compact CLIP vocabulary (the toy world's
words with the pieces CLIP gives them, the default initialisers, every byte character; see
cdtool.clip_vocab.compact_vocab_and_merges), pooled at end-of-text, then a linear projection. Image
side: a small CNN trained from scratch (`--oracle-trunk` starts it from the oracle's convolutions
instead, as the 96-wide research encoder did). Scenes and captions are those of the UNet's
pretraining (`pretrain_toy.batch`), varied views and wordings, two-tone things in named colours
(`--patterns`), of the `--world`. The rows of tokens the captions never use keep their initial values
(no weight decay on the embedding table), as untrained as CLIP's rare tokens.

Resumable (tools/resumable.py): `--minutes` bounds this run, a checkpoint is written every
`--save-minutes` and at the end, `--resume DIR` continues the optimiser, step count and data stream;
`--steps` is the whole schedule (warm-up, then cosine decay), over as many runs as it takes. The
folder also gets `text_encoder/` (float32, diffusers layout) and `tokenizer/` at every save.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pretrain_toy builds the scenes

from pretrain_toy import TEXT, batch
from resumable import (
    Budget,
    load_checkpoint,
    load_into,
    module_tensors,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    step_generator,
    step_rng,
    trainable,
)


def pooled_rows(hidden: torch.Tensor, ids: torch.Tensor, eos_id: int, gen: torch.Generator) -> tuple:
    """(end-of-text rows, one random later row per caption) of `hidden` [n, L, d]."""
    n, length, _ = hidden.shape
    eos = (ids == eos_id).int().argmax(dim=1)
    later = eos + (torch.rand(n, generator=gen) * (length - eos).float()).long()  # in [eos, length - 1]
    rows = torch.arange(n)
    return hidden[rows, eos], hidden[rows, later]


class ImageTower(torch.nn.Module):
    """A small CNN (the oracle's convolutional layout) and a projection to the text width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        from cdtool.toy.oracle import Oracle

        trunk = Oracle()
        self.features = trunk.features
        self.proj = torch.nn.Linear(trunk.hidden[0].in_features, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


def toy_tokenizer(folder: Path):  # -> transformers.CLIPTokenizer
    """The compact toy tokenizer, written into `folder` (once) and loaded from it."""
    from transformers import CLIPTokenizer

    from cdtool.models.clip_vocab import MODEL_MAX_LENGTH, compact_vocab_and_merges, write_tokenizer
    from cdtool.models.tokens import DEFAULT_INIT
    from cdtool.toy.world import caption_words

    if not (folder / "tokenizer_config.json").exists():
        write_tokenizer(folder, *compact_vocab_and_merges(caption_words(), DEFAULT_INIT))
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MODEL_MAX_LENGTH)


def build(args, tokenizer) -> tuple:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = dict(
        TEXT,
        vocab_size=len(tokenizer),
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_attention_heads=args.heads,
        num_hidden_layers=args.layers,
        projection_dim=args.width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = CLIPTextModel(CLIPTextConfig(**config)).train()
    image = ImageTower(args.width).train()
    if args.oracle_trunk:  # the world's own oracle: the shipped one reads the suite's world
        from cdtool.toy.oracle import load_oracle

        v1 = Path(__file__).resolve().parent / "checkpoints" / "toy1" / "oracle.safetensors"
        image.features.load_state_dict(load_oracle(str(v1) if args.world == "v1" else None).features.state_dict())
    text_proj = torch.nn.Linear(args.width, args.width, bias=False)
    heads = torch.nn.ParameterDict({"log_scale": torch.nn.Parameter(torch.tensor(2.659))})  # CLIP's log(1/0.07)
    identity = torch.nn.Linear(args.width, args.width, bias=False)
    roles = torch.nn.Linear(args.width, len(ROLES))
    return text, image, text_proj, heads, identity, roles


def contrastive_loss(args, models, tokenizer, step: int) -> tuple[torch.Tensor, float]:
    """The loss of step `step` (its batch drawn from (seed, step)) and the caption-to-image top-1."""
    from cdtool.toy.world import LOOKS, Sampler

    text, image, text_proj, heads, identity, roles = models
    x, captions = batch(
        Sampler(step_rng(args.seed, step)),
        args.batch,
        views=True,
        named_patterns=args.patterns,
        world=args.world,
        looks=args.looks,
    )
    plain = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = with_rare_names(plain, tokenizer, args.rare, step_generator(args.seed + 1, step)) if args.rare else plain
    hidden = text(ids)[0]
    img = F.normalize(image((x + 1) / 2), dim=-1)
    scale = heads["log_scale"].clamp(max=4.6052).exp()
    labels = torch.arange(len(captions))
    pooled = pooled_rows(hidden, ids, tokenizer.eos_token_id, step_generator(args.seed, step))
    swapped = swapped_rows(text, tokenizer, captions, step_generator(args.seed, step)) if args.order_negatives else None
    loss = torch.zeros(())
    for i, rows in enumerate(pooled):
        logits = scale * F.normalize(text_proj(rows), dim=-1) @ img.T
        to_text = logits.T  # each image against every caption of the batch
        if swapped is not None:  # NegCLIP: and against the two-tone captions with their tones swapped
            to_text = torch.cat([to_text, scale * img @ F.normalize(text_proj(swapped[i]), dim=-1).T], 1)
        loss = loss + (F.cross_entropy(logits, labels) + F.cross_entropy(to_text, labels)) / 4
    top1 = float((logits.argmax(dim=1) == labels).float().mean())
    if args.roles:
        loss = loss + args.roles * role_loss(hidden, ids, role_labels(ids, tokenizer), roles)
    if args.identity:
        loss = loss + args.identity * identity_loss(hidden, ids, tokenizer.eos_token_id, identity, text)
    if args.keep:
        teacher, teacher_tokenizer = teacher_of(args)
        order = args.order_negatives or args.roles  # order training moves two-tone captions' rows
        ordinary = [
            i for i, c in enumerate(captions) if not (set(c.split()) & set(LOOKS) or (order and swapped_tones(c)))
        ]
        teacher_ids = teacher_tokenizer(
            [captions[i] for i in ordinary], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        loss = loss + args.keep * kept_rows_loss(text, plain[ordinary], teacher, teacher_ids)
    return loss, top1


# What a colour word's row is for in a caption: a plain thing's colour ("a red star"), or the first
# or second tone of a two-tone thing ("a red and blue striped star").
ROLES = ("plain", "first tone", "second tone")


@functools.cache
def pair_phrase() -> re.Pattern[str]:
    """The two-tone phrase of the toy world's captions: "<colour> and <colour> <kind word>"."""
    from cdtool.toy.world import COLOURS, KIND_WORDS

    colour = "|".join(COLOURS)
    return re.compile(rf"\b({colour}) and ({colour}) ({'|'.join(KIND_WORDS.values())})\b")


def swapped_tones(caption: str) -> str | None:
    """`caption` with the two tones of its two-tone things swapped ("a blue and red striped star"
    for "a red and blue striped star"), or None when it names no two-tone thing in named colours."""
    swapped, n = pair_phrase().subn(r"\2 and \1 \3", caption)
    return swapped if n else None


def role_labels(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Per token of `ids` [n, L]: the index in ROLES of a colour word's role, -100 for every other
    token (ignored by the loss)."""
    from cdtool.toy.world import COLOURS

    colours = torch.tensor(tokenizer.convert_tokens_to_ids([f"{c}</w>" for c in COLOURS]))
    and_id = tokenizer.convert_tokens_to_ids("and</w>")
    is_colour = torch.isin(ids, colours)
    labels = torch.where(is_colour, 0, -100)
    before_and = torch.zeros_like(is_colour)
    before_and[:, :-2] = is_colour[:, :-2] & (ids[:, 1:-1] == and_id) & is_colour[:, 2:]
    labels[before_and] = 1
    after = torch.zeros_like(is_colour)
    after[:, 2:] = before_and[:, :-2]
    labels[after] = 2
    return labels


def role_loss(hidden: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """Cross-entropy of reading each colour word's role (ROLES) from its output row: the rows say which
    tone comes first, as a causal encoder's rows can (the second tone's row has seen the first), so a
    UNet can put each tone in its place."""
    mask = labels >= 0
    return F.cross_entropy(head(hidden[mask]), labels[mask]) if mask.any() else hidden.sum() * 0


def swapped_rows(
    text, tokenizer, captions: list[str], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(end-of-text rows, one random later row each) of the batch's two-tone captions with their
    tones swapped (swapped_tones), the hard negatives of NegCLIP (Yuksekgonul et al. 2023, who
    found CLIP blind to word order for want of them), which every image of the batch is scored
    against beside the batch's captions; None when the batch has no such caption. They are the
    captions written out again: without --rare's names, and their later rows drawn from `gen` as
    the first of the batch's captions' were (a padding row summarises its caption like any other)."""
    swapped = [s for s in map(swapped_tones, captions) if s]
    if not swapped:
        return None
    ids = tokenizer(swapped, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pooled_rows(text(ids)[0], ids, tokenizer.eos_token_id, gen)


def with_rare_names(ids: torch.Tensor, tokenizer, share: float, gen: torch.Generator) -> torch.Tensor:
    """`ids` with, in a `share` of the captions, one random entry of the vocabulary (any but the start
    and end markers) put before the first thing's noun ("a small ucd star on ..."), as web captions
    name things with rare words: CLIP met every entry of its vocabulary in training, so a rare token's
    row, the one a new token starts from, keeps its identity in any context. Captions are shifted
    right by one; the last padding entry drops off."""
    from cdtool.toy.world import SHAPES

    nouns = torch.tensor(tokenizer.convert_tokens_to_ids([f"{s}</w>" for s in SHAPES]))
    special = torch.tensor([tokenizer.bos_token_id, tokenizer.eos_token_id])
    out = ids.clone()
    for i in range(ids.shape[0]):
        if float(torch.rand((), generator=gen)) >= share:
            continue
        at = int(torch.isin(ids[i], nouns).int().argmax())
        while True:
            name = int(torch.randint(0, len(tokenizer), (), generator=gen))
            if name not in special:
                break
        out[i] = torch.cat([ids[i, :at], torch.tensor([name]), ids[i, at:-1]])
    return out


_TEACHER: dict = {}


def teacher_of(args) -> tuple:
    """(the frozen encoder `--keep-from` names, its tokenizer), loaded once: a model folder or a text
    run folder, holding text_encoder/ and tokenizer/."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if args.keep_from not in _TEACHER:
        folder = Path(args.keep_from)
        model = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).float().eval().requires_grad_(False)
        _TEACHER[args.keep_from] = (model, CLIPTokenizer.from_pretrained(str(folder / "tokenizer")))
    return _TEACHER[args.keep_from]


def kept_rows_loss(text, ids: torch.Tensor, teacher, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of every row (words, end-of-text and padding) of ordinary captions, `ids`
    in this encoder's vocabulary and `teacher_ids` the same captions in the frozen `teacher`'s, from
    the teacher's rows, over their mean square: a UNet trained on the teacher keeps reading these
    captions as it learned to, whatever entries the vocabulary gained."""
    with torch.no_grad():
        want = teacher(teacher_ids)[0]
    return F.mse_loss(text(ids)[0], want) / want.pow(2).mean()


def needs_growth(folder: Path) -> bool:
    """Whether the tokenizer in `folder` lacks an entry the toy world's words need now."""
    from transformers import CLIPTokenizer

    from cdtool.models.clip_vocab import compact_vocab_and_merges
    from cdtool.models.tokens import DEFAULT_INIT
    from cdtool.toy.world import caption_words

    have = CLIPTokenizer.from_pretrained(str(folder)).get_vocab()
    return any(entry not in have for entry in compact_vocab_and_merges(caption_words(), DEFAULT_INIT)[0])


def grown_table(start: dict[str, torch.Tensor], old_vocab: dict[str, int], tokenizer, fresh: torch.Tensor) -> None:
    """Carries the embedding rows of `start` (a checkpoint over `old_vocab`) to the entries of
    `tokenizer`'s vocabulary that had them, in place; the new entries keep their rows in `fresh` (the
    new table, freshly initialised). Used when the world's words gained entries (LOOKS)."""
    key = "text.embeddings.token_embedding.weight"
    old = start[key].float()
    table = fresh.detach().clone()
    for entry, new_id in tokenizer.get_vocab().items():
        if entry in old_vocab:
            table[new_id] = old[old_vocab[entry]]
    start[key] = table


def identity_loss(hidden: torch.Tensor, ids: torch.Tensor, eos_id: int, head: torch.nn.Linear, text) -> torch.Tensor:
    """Cross-entropy of reading each word's own token back from its output row (through `head`, against
    the embedding table, which this loss does not move): the rows of a caption's words keep their
    token's identity whatever precedes them, as CLIP's do (its per-word cross-attention maps
    localise each word's object), while the padding rows summarise the caption."""
    eos = (ids == eos_id).int().argmax(dim=1, keepdim=True)
    pos = torch.arange(ids.shape[1])[None]
    words = (pos >= 1) & (pos < eos)
    table = text.get_input_embeddings().weight.detach()
    return F.cross_entropy(head(hidden[words]) @ table.T, ids[words])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256, help="the text features' width (the UNet's cross_attention_dim)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3000, help="the whole schedule, over as many runs as it takes")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--patterns", type=float, default=0.3, help="share of scenes with a two-tone thing in named colours"
    )
    ap.add_argument("--world", choices=("v1", "v2"), default="v2", help="which pattern kinds pretraining shows")
    ap.add_argument(
        "--oracle-trunk",
        action="store_true",
        help="start the image CNN from the world's oracle's convolutions (v2: the shipped one)",
    )
    ap.add_argument(
        "--identity",
        type=float,
        default=0.0,
        help="weight of the loss that keeps each word's row its token's (see identity_loss); 0: contrastive only",
    )
    ap.add_argument(
        "--rare",
        type=float,
        default=0.0,
        help="share of captions with a random vocabulary entry as a name (see with_rare_names)",
    )
    ap.add_argument(
        "--looks", type=float, default=0.0, help="share of captions naming a thing by a LOOKS word (pretrain_toy.batch)"
    )
    ap.add_argument(
        "--order-negatives",
        action="store_true",
        help="NegCLIP: the batch's two-tone captions with their tones swapped join the captions every image is "
        "scored against (see swapped_rows)",
    )
    ap.add_argument(
        "--roles", type=float, default=0.0, help="weight of the loss that each colour word's row tells its role (ROLES)"
    )
    ap.add_argument(
        "--keep-from",
        help="a model or text run folder whose encoder's rows of ordinary captions to keep (see kept_rows_loss)",
    )
    ap.add_argument("--keep", type=float, default=0.0, help="weight of keeping --keep-from's rows")
    ap.add_argument("--init", type=Path, help="start from another run's weights (a new schedule, a fresh optimiser)")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this run")
    ap.add_argument("--until", type=int, help="stop this run at this step (default: --steps)")
    ap.add_argument("--save-minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", type=Path, help="a run folder to continue (its settings are kept)")
    ap.add_argument("--out", type=Path, help="the run folder (default: --resume's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or args.resume
    if out is None:
        ap.error("give --out or --resume")
    saved, meta = load_checkpoint(args.resume) if args.resume else ({}, {"step": 0, "seconds": 0.0})
    if args.resume:
        args = argparse.Namespace(
            **{**vars(args), **meta["settings"], "minutes": args.minutes, "threads": args.threads}
        )
    torch.manual_seed(args.seed)
    grow = args.init is not None and not args.resume and needs_growth(args.init / "tokenizer")
    tokenizer = toy_tokenizer((args.resume or (None if grow else args.init) or out) / "tokenizer")
    models = build(args, tokenizer)
    text, image, text_proj, heads, identity, roles = models
    parts = (
        ("text", text),
        ("image", image),
        ("text_proj", text_proj),
        ("heads", heads),
        ("identity", identity),
        ("roles", roles),
    )
    start = load_checkpoint(args.init)[0] if args.init and not args.resume else saved
    if grow:
        old_vocab = toy_tokenizer(args.init / "tokenizer").get_vocab()
        grown_table(start, old_vocab, tokenizer, text.get_input_embeddings().weight)
        print(f"vocabulary grown from {len(old_vocab)} to {len(tokenizer)} entries", flush=True)
    for prefix, module in parts:
        load_into(module, prefix, start)
    named = trainable(parts)
    table = text.get_input_embeddings().weight
    opt = torch.optim.AdamW(
        [
            {"params": [table], "weight_decay": 0.0},
            {"params": [p for p in named.values() if p is not table], "weight_decay": 1e-2},
        ],
        lr=args.lr,
    )
    restore_optimizer(opt, named, saved, meta["step"])
    warm = 100

    def lr_at(step: int) -> float:
        import math

        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, args.steps - warm))))

    budget = Budget(args.minutes, args.save_minutes)
    step, running = meta["step"], None

    def save() -> None:
        tensors = {k: v for prefix, m in parts for k, v in module_tensors(prefix, m).items()}
        tensors |= optimizer_tensors(opt, named)
        settings = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "minutes", "threads", "until")}
        settings["init"] = str(args.init) if args.init else None
        save_checkpoint(
            out, tensors, {"step": step, "seconds": meta["seconds"] + budget.elapsed(), "settings": settings}
        )
        text.save_pretrained(out / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(out / "tokenizer")

    while step < min(args.steps, args.until or args.steps) and budget.left():
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, top1 = contrastive_loss(args, models, tokenizer, step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), 1.0)
        opt.step()
        step += 1
        now = torch.tensor([float(loss.detach()), top1])
        running = now if running is None else 0.95 * running + 0.05 * now
        if step % 25 == 0:
            print(
                f"text {step}: loss {running[0]:.3f} caption->image top-1 {running[1]:.2f} ({budget.elapsed():.0f}s)",
                flush=True,
            )
        if budget.save_due():
            save()
    save()
    print(f"stopped at step {step} of {args.steps} after {budget.elapsed():.0f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
