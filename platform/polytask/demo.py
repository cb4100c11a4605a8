"""A generated two-task data set (sentiment + NER) and a tiny random encoder, both offline.

The quickstart trains on these, and the tests build the same things at tiny sizes, so nothing
ever downloads weights or data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

PEOPLE = ["alice", "bob", "carlos", "dana", "elena", "farid", "grace", "hiro", "ines", "jamal"]
SURNAMES = ["smith", "garcia", "tanaka", "okafor", "novak", "silva"]
PLACES = ["paris", "london", "tokyo", "lagos", "lima", "oslo", "cairo", "new york", "san diego"]
ORGS = ["acme", "globex", "initech", "umbrella corp", "stark industries"]
POSITIVE = ["great", "wonderful", "excellent", "lovely", "brilliant", "delightful", "superb"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "bad"]
ADVERBS = ["absolutely", "really", "truly", "honestly", "quite", "so", "pretty"]
THINGS = ["movie", "meal", "hotel", "concert", "book", "service", "trip", "game"]
# Slots: {P} person, {L} place, {O} organisation (the entities); {T} thing, {A} a sentiment
# adjective, {R} an adverb (never entities). Sentiment sentences are in the NER data too, tagged,
# so the NER head learns that opinion words, adverbs and pronouns are not names.
SENTIMENT_TEMPLATES = [
    "the {T} was {A}",
    "what a {A} {T}",
    "honestly the {T} felt {A} to me",
    "the {T} was {R} {A}",
    "we thought the {T} in {L} was {A}",
    "the {T} in {L} was {R} {A}",
    "{P} said the {T} was really {A}",
    "{P} thought the {T} at {O} was {R} {A}",
    "i found the {T} {R} {A}",
    "our {T} with {P} in {L} was {A}",
    "everyone at {O} said the {T} was {A}",
    "the {T} felt {R} {A} to us",
    "{R} a {A} {T} in {L}",
    "my friends found the {T} {A}",
    "to me the {T} from {O} was {R} {A}",
    "{P} and i had a {A} {T} in {L}",
]
NER_TEMPLATES = [
    "{P} flew to {L} last week",
    "yesterday {P} met {P} in {L}",
    "{P} works for {O} near {L}",
    "the team from {O} visited {L}",
    "i saw {P} at the {O} office",
    "{P} and {P} moved to {L}",
    "{O} opened a store in {L} today",
    "we met {P} at the {T} in {L}",
    "{P} joined {O} last year",
    "they drove from {L} to {L}",
    "{P} told me about the {T}",
    "we booked the {T} through {O}",
    "i will call {P} tomorrow",
    # no entities at all
    "we went to the {T} yesterday",
    "the {T} starts at noon",
    "they asked me about the {T}",
]
_ENTITY_SLOTS = {"{P}": "person", "{L}": "location", "{O}": "organization"}


def _fill(template: str, rng: random.Random, adjective: str) -> tuple[list[str], list[str]]:
    """Words and IOB2 tags for one template; only the entity slots get B-/I- tags."""
    tokens: list[str] = []
    tags: list[str] = []
    for part in template.split():
        etype = _ENTITY_SLOTS.get(part)
        if etype == "person":
            name = rng.choice(PEOPLE) + (" " + rng.choice(SURNAMES) if rng.random() < 0.4 else "")
        elif etype is not None:
            name = rng.choice(PLACES if etype == "location" else ORGS)
        else:
            name = {"{T}": rng.choice(THINGS), "{A}": adjective, "{R}": rng.choice(ADVERBS)}.get(part, part)
        words = name.split()
        tokens += words
        tags += ([f"B-{etype}"] + [f"I-{etype}"] * (len(words) - 1)) if etype else ["O"] * len(words)
    return tokens, tags


def _sentiment_example(rng: random.Random) -> dict[str, str]:
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    tokens, _ = _fill(rng.choice(SENTIMENT_TEMPLATES), rng, adjective)
    return {"text": " ".join(tokens), "label": "positive" if positive else "negative"}


def _ner_example(rng: random.Random) -> tuple[list[str], list[str]]:
    """Entity sentences and (tagged, all-O outside the names) opinion sentences, about half each."""
    template = rng.choice(SENTIMENT_TEMPLATES + NER_TEMPLATES)
    return _fill(template, rng, rng.choice(POSITIVE + NEGATIVE))


def write_demo_data(root: str | Path, n_train: int = 400, n_eval: int = 100, seed: int = 0) -> Path:
    """sentiment/{train,validation}.jsonl and ner/{train,validation}.conll under `root`."""
    root = Path(root)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("validation", n_eval)):
        (root / "sentiment").mkdir(parents=True, exist_ok=True)
        with open(root / "sentiment" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(_sentiment_example(rng)) + "\n" for _ in range(n))
        (root / "ner").mkdir(parents=True, exist_ok=True)
        with open(root / "ner" / f"{split}.conll", "w") as f:
            f.write("-DOCSTART-\tO\n\n")
            for _ in range(n):
                tokens, tags = _ner_example(rng)
                f.write("".join(f"{t}\t{g}\n" for t, g in zip(tokens, tags)) + "\n")
    return root


def entities_target(tokens: list[str], tags: list[str]) -> str:
    """The entity strings of an IOB2-tagged sentence joined by ' ; ', or 'none': a generation
    target that is deterministic from the source (the demo and benchmark generation task)."""
    spans: list[list[str]] = []
    current: list[str] | None = None
    for token, tag in zip(tokens, tags):
        if tag.startswith("I-") and current is not None:
            current.append(token)
            continue
        current = [token] if tag.startswith(("B-", "I-")) else None
        if current is not None:
            spans.append(current)
    return " ; ".join(" ".join(span) for span in spans) or "none"


def write_generation_data(root: str | Path, n_train: int = 400, n_eval: int = 100, seed: int = 0) -> Path:
    """`root/entities/{train,validation}.jsonl`: {"text": sentence, "target": its entities}."""
    root = Path(root)
    rng = random.Random(seed + 7)
    (root / "entities").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval)):
        with open(root / "entities" / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                tokens, tags = _ner_example(rng)
                row = {"text": " ".join(tokens), "target": entities_target(tokens, tags)}
                f.write(json.dumps(row) + "\n")
    return root


def demo_corpus() -> list[str]:
    rng = random.Random(1)
    lines = [_sentiment_example(rng)["text"] for _ in range(300)]
    lines += [" ".join(_ner_example(rng)[0]) for _ in range(300)]
    return lines


def write_tiny_encoder(
    path: str | Path, hidden_size: int = 32, layers: int = 2, vocab_size: int = 300, seed: int = 0
) -> Path:
    """A random BertModel and a WordPiece tokenizer trained on the demo corpus; small vocab, so
    many words split into several sub-tokens (which is what NER alignment must handle)."""
    from transformers import BertConfig, BertModel

    def build(fast: Any) -> Any:
        return BertModel(
            BertConfig(
                vocab_size=len(fast),
                hidden_size=hidden_size,
                num_hidden_layers=layers,
                num_attention_heads=4,
                intermediate_size=hidden_size * 2,
                max_position_embeddings=128,
            )
        )

    return _write_tiny(path, build, vocab_size, seed)


def write_tiny_seq2seq(
    path: str | Path, hidden_size: int = 32, layers: int = 2, vocab_size: int = 300, seed: int = 0
) -> Path:
    """A random T5 encoder-decoder (an encoder-decoder checkpoint, `head.decoder: checkpoint`)
    with the demo WordPiece tokenizer: start = PAD, end = SEP."""
    from transformers import T5Config, T5ForConditionalGeneration

    def build(fast: Any) -> Any:
        return T5ForConditionalGeneration(
            T5Config(
                vocab_size=len(fast),
                d_model=hidden_size,
                d_kv=hidden_size // 4,
                d_ff=hidden_size * 2,
                num_layers=layers,
                num_decoder_layers=layers,
                num_heads=4,
                pad_token_id=fast.pad_token_id,
                eos_token_id=fast.sep_token_id,
                decoder_start_token_id=fast.pad_token_id,
            )
        )

    return _write_tiny(path, build, vocab_size, seed)


def _write_tiny(path: str | Path, build: Any, vocab_size: int, seed: int) -> Path:
    """`build(tokenizer)` seeded, saved (safetensors) beside the demo tokenizer."""
    import torch

    path = Path(path)
    fast = demo_tokenizer(vocab_size)
    torch.manual_seed(seed)
    build(fast).save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def demo_tokenizer(vocab_size: int) -> Any:
    """A fast WordPiece tokenizer ([CLS] a [SEP] b [SEP]) trained on the demo corpus."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        demo_corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def demo_experiment(
    data_dir: str | Path,
    encoder: str | Path,
    *,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 5e-4,
    num_workers: int = 2,
    registered_model: str | None = "polytask-demo",
    **overrides: Any,
) -> dict[str, Any]:
    """The demo experiment as a dict (what a user would write in YAML)."""
    data_dir = Path(data_dir).resolve()
    cfg: dict[str, Any] = {
        "encoder": {"name_or_path": str(encoder), "max_length": 64, "pooling": "cls"},
        "tasks": [
            {
                "name": "sentiment",
                "kind": "classification",
                "data": {
                    "train": str(data_dir / "sentiment/train.jsonl"),
                    "validation": str(data_dir / "sentiment/validation.jsonl"),
                },
            },
            {
                "name": "ner",
                "kind": "token_classification",
                "data": {
                    "train": str(data_dir / "ner/train.conll"),
                    "validation": str(data_dir / "ner/validation.conll"),
                },
            },
        ],
        "sampling": {"strategy": "temperature", "temperature": 2.0},
        "optim": {"lr": lr, "epochs": epochs, "batch_size": batch_size, "warmup_ratio": 0.1},
        "scaling": {"num_workers": num_workers},
        "tracking": {"registered_model": registered_model},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_yaml(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
