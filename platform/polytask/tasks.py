"""Task kinds: each kind is one small object holding its head shape, loss, metrics and decoder.

Adding a kind means adding one `TaskKind(...)` entry to `KINDS` below. torch, sklearn and
seqeval are imported inside the functions, so `polytask validate` can read kind names cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


# A new decoder's fresh parameters (cross-attention, LM transform) learn at this rate unless
# `new_lr_scale` ties them to the head rate: the copy-task learning curves chose it (dev BLEU 91.6
# after 500 steps at the default 5e-5 elsewhere, ahead of 1e-3 for the whole head with the encoder
# at 3e-5; bench_results/generation_quality). An absolute rate, not a multiple of the head rate,
# so a config that raises `optim.head_lr` for its classifiers does not push the decoder past it.
NEW_PARAMETERS_LR = 1e-3


@dataclass(frozen=True)
class GenerationSpec:
    """How a generation task's decoder is built, trained and run (`head.*` and `generation.*`).

    `decoder`: "checkpoint" (the encoder-decoder checkpoint's own decoder + LM head) or "new" (a
    `decoder_layers`-layer decoder with cross-attention); training resolves None to one.
    `decoder_init` (new): "encoder" copies the encoder's embeddings and `decoder_layers_from` end
    of its layers into the decoder (cross-attention and LM transform start fresh), "random" starts
    all fresh; training resolves None to "encoder" where the encoder's layout allows it.
    `new_lr_scale` multiplies the head learning rate for the decoder's fresh parameters; None
    gives them NEW_PARAMETERS_LR."""

    decoder: str | None = None
    decoder_layers: int = 2
    decoder_init: str | None = None
    decoder_layers_from: str = "bottom"
    new_lr_scale: float | None = None
    tie_embeddings: bool = True
    label_smoothing: float = 0.0
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class TaskSpec:
    """A task as training resolved it (labels known): what a bundle stores and serving reads."""

    name: str
    kind: str
    labels: list[str]
    dropout: float = 0.1
    hidden_dim: int | None = None
    threshold: float = 0.5
    metric: str | None = None
    pair: bool = False  # the task reads a second text (its data named `text_pair_field`)
    generation: GenerationSpec | None = None  # generation tasks only

    def __post_init__(self) -> None:
        # pair_classification is classification that always takes a pair; old bundles lack `pair`
        if KINDS[self.kind].pair_only and not self.pair:
            object.__setattr__(self, "pair", True)
        if isinstance(self.generation, dict):
            object.__setattr__(self, "generation", GenerationSpec(**self.generation))
        if self.is_generation and self.generation is None:
            object.__setattr__(self, "generation", GenerationSpec())

    @property
    def task_kind(self) -> TaskKind:
        return KINDS[self.kind]

    @property
    def is_generation(self) -> bool:
        """Whether the head writes text (a decoder over token states) rather than scores: the one
        test serving, training and inference use for "is this a generation task"."""
        return generates_text(self.kind)

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "dropout": self.dropout,
            "hidden_dim": self.hidden_dim,
            "threshold": self.threshold,
            "metric": self.metric or KINDS[self.kind].primary_metric,
            "pair": self.pair,
            **({"generation": self.generation.to_dict()} if self.generation else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class TaskKind:
    """One kind of task. Functions take numpy per example so training and serving share them.
    Whether a task reads a text pair is the task's (`TaskSpec.pair`), not the kind's: any
    sentence-level kind can."""

    name: str
    level: Literal["sentence", "token", "sequence"]  # sequence: reads token states, writes text
    metric_names: tuple[str, ...]
    primary_metric: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metrics: Callable[[list[np.ndarray], list[Any], TaskSpec], dict[str, float]]
    decode: Callable[..., dict[str, Any]]
    encode_target: Callable[[Any, TaskSpec], Any] = field(default=lambda raw, spec: raw)
    pair_only: bool = False  # pair_classification: an alias of classification that needs a pair

    @property
    def sequence_labels(self) -> bool:
        """Labels are a sequence padded with -100 (tags, target ids), not one value per input."""
        return self.level != "sentence"


def generates_text(kind: str) -> bool:
    """Whether tasks of `kind` are generation tasks (`TaskSpec.is_generation`, and the config's
    `TaskConfig.is_generation` before labels are known)."""
    return KINDS[kind].level == "sequence"


def build_head(spec: TaskSpec, hidden_size: int) -> torch.nn.Module:
    """Dropout → (Linear → GELU →) Linear; the same shape for every kind, sized by the spec.
    A generation head is a decoder: `model/generation.py` builds it."""
    from torch import nn

    if spec.is_generation:
        raise ValueError(f"task '{spec.name}' is a generation task: build its head with build_generation_head")

    layers: list[nn.Module] = [nn.Dropout(spec.dropout)]
    width = hidden_size
    if spec.hidden_dim:
        layers += [nn.Linear(hidden_size, spec.hidden_dim), nn.GELU(), nn.Dropout(spec.dropout)]
        width = spec.hidden_dim
    layers.append(nn.Linear(width, spec.num_outputs))
    return nn.Sequential(*layers)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _label_index(raw: Any, spec: TaskSpec) -> int:
    return spec.labels.index(str(raw))


# --- single-label classification -------------------------------------------------------------


def _ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), targets.long(), ignore_index=IGNORE_INDEX)


def _classification_metrics(logits: list[np.ndarray], targets: list[Any], spec: TaskSpec):
    from sklearn.metrics import accuracy_score, f1_score

    pred = np.argmax(np.stack(logits), axis=-1)
    gold = np.asarray(targets)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(
            f1_score(gold, pred, average="macro", labels=range(len(spec.labels)), zero_division=0)
        ),
    }


def _classification_decode(logits: np.ndarray, spec: TaskSpec, **_: Any) -> dict[str, Any]:
    probs = _softmax(logits.astype(np.float64))
    best = int(np.argmax(probs))
    return {
        "label": spec.labels[best],
        "score": float(probs[best]),
        "probabilities": {lab: float(p) for lab, p in zip(spec.labels, probs)},
    }


# --- multilabel ---------------------------------------------------------------------------------


def _bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def _multilabel_target(raw: Any, spec: TaskSpec) -> list[float]:
    hot = [0.0] * len(spec.labels)
    for lab in raw:
        hot[_label_index(lab, spec)] = 1.0
    return hot


def _multilabel_metrics(logits: list[np.ndarray], targets: list[Any], spec: TaskSpec):
    from sklearn.metrics import f1_score

    pred = (1 / (1 + np.exp(-np.stack(logits))) >= spec.threshold).astype(int)
    gold = np.asarray(targets).astype(int)
    return {
        "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "exact_match": float((pred == gold).all(axis=1).mean()),
    }


def _multilabel_decode(logits: np.ndarray, spec: TaskSpec, **_: Any) -> dict[str, Any]:
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return {
        "labels": [lab for lab, p in zip(spec.labels, probs) if p >= spec.threshold],
        "probabilities": {lab: float(p) for lab, p in zip(spec.labels, probs)},
    }


# --- regression ---------------------------------------------------------------------------------


def _mse_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.mse_loss(logits.float().squeeze(-1), targets.float())


def _regression_metrics(logits: list[np.ndarray], targets: list[Any], spec: TaskSpec):
    from scipy.stats import pearsonr, spearmanr

    pred = np.stack(logits).reshape(-1).astype(np.float64)
    gold = np.asarray(targets, dtype=np.float64)
    constant = np.ptp(pred) == 0 or np.ptp(gold) == 0
    return {
        "mse": float(np.mean((pred - gold) ** 2)),
        "pearson": 0.0 if constant else float(pearsonr(pred, gold)[0]),
        "spearman": 0.0 if constant else float(spearmanr(pred, gold)[0]),
    }


def _regression_decode(logits: np.ndarray, spec: TaskSpec, **_: Any) -> dict[str, Any]:
    return {"value": float(np.asarray(logits).reshape(-1)[0])}


# --- token classification (IOB2 / BIO) ------------------------------------------------------------


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _ce_loss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _token_metrics(logits: list[np.ndarray], targets: list[Any], spec: TaskSpec):
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    gold_seqs, pred_seqs = [], []
    for lg, tg in zip(logits, targets):
        tg = np.asarray(tg)
        keep = tg != IGNORE_INDEX
        gold_seqs.append([spec.labels[i] for i in tg[keep]])
        pred_seqs.append([spec.labels[i] for i in np.argmax(lg, axis=-1)[keep]])
    kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {
        "f1": float(f1_score(gold_seqs, pred_seqs, **kw)),
        "precision": float(precision_score(gold_seqs, pred_seqs, **kw)),
        "recall": float(recall_score(gold_seqs, pred_seqs, **kw)),
        "token_accuracy": float(accuracy_score(gold_seqs, pred_seqs)),
    }


def _token_decode(
    logits: np.ndarray,
    spec: TaskSpec,
    *,
    text: str,
    word_ids: list[int | None],
    word_spans: list[tuple[int, int]],
    **_: Any,
) -> dict[str, Any]:
    """Tag each word by its first sub-token, then join B-/I- runs into character-offset spans."""
    probs = _softmax(logits.astype(np.float64))
    tags: dict[int, tuple[str, float]] = {}
    for pos, wid in enumerate(word_ids):
        if wid is not None and wid not in tags and pos < len(probs):
            best = int(np.argmax(probs[pos]))
            tags[wid] = (spec.labels[best], float(probs[pos][best]))
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for wid in sorted(tags):
        tag, score = tags[wid]
        prefix, _, etype = tag.partition("-")
        start, end = word_spans[wid]
        if prefix == "I" and current is not None and current["type"] == etype:
            current["end"] = end
            current["scores"].append(score)
            continue
        if current is not None:
            entities.append(current)
            current = None
        if prefix in ("B", "I") and etype:
            current = {"type": etype, "start": start, "end": end, "scores": [score]}
    if current is not None:
        entities.append(current)
    for ent in entities:
        ent["text"] = text[ent["start"] : ent["end"]]
        ent["score"] = float(np.mean(ent.pop("scores")))
    return {"entities": [{k: e[k] for k in ("type", "text", "start", "end", "score")} for e in entities]}


# --- generation (text → text) ---------------------------------------------------------------------


def generation_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0):
    """Teacher-forced cross-entropy over target tokens; padding (-100) is ignored."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def _generation_metrics(predictions: list[str], references: list[Any], spec: TaskSpec):
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-L F1 (rouge-score) and `exact` (the share of whole
    texts equal to their reference, ends trimmed), all on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = [str(r) for r in references]
    preds = [str(p) for p in predictions]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(refs, preds)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(preds, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(preds, [refs]).score),
        "rouge_l": 100.0 * float(np.mean(rouge)) if rouge else 0.0,
        "exact": 100.0 * float(np.mean([p.strip() == r.strip() for p, r in zip(preds, refs)])) if refs else 0.0,
    }


def _generation_decode(text: str, spec: TaskSpec, **_: Any) -> dict[str, Any]:
    return {"text": text}


KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        TaskKind(
            name="classification",
            level="sentence",
            metric_names=("accuracy", "macro_f1"),
            primary_metric="accuracy",
            loss=_ce_loss,
            metrics=_classification_metrics,
            decode=_classification_decode,
            encode_target=_label_index,
        ),
        TaskKind(
            name="multilabel",
            level="sentence",
            metric_names=("micro_f1", "macro_f1", "exact_match"),
            primary_metric="micro_f1",
            loss=_bce_loss,
            metrics=_multilabel_metrics,
            decode=_multilabel_decode,
            encode_target=_multilabel_target,
        ),
        TaskKind(
            name="token_classification",
            level="token",
            metric_names=("f1", "precision", "recall", "token_accuracy"),
            primary_metric="f1",
            loss=_token_loss,
            metrics=_token_metrics,
            decode=_token_decode,
            encode_target=_label_index,
        ),
        TaskKind(
            name="pair_classification",
            level="sentence",
            metric_names=("accuracy", "macro_f1"),
            primary_metric="accuracy",
            loss=_ce_loss,
            metrics=_classification_metrics,
            decode=_classification_decode,
            encode_target=_label_index,
            pair_only=True,
        ),
        TaskKind(
            name="regression",
            level="sentence",
            metric_names=("pearson", "spearman", "mse"),
            primary_metric="pearson",
            loss=_mse_loss,
            metrics=_regression_metrics,
            decode=_regression_decode,
            encode_target=lambda raw, spec: float(raw),
        ),
        TaskKind(
            name="generation",
            level="sequence",
            metric_names=("bleu", "chrf", "rouge_l", "exact"),
            primary_metric="bleu",
            loss=generation_loss,
            metrics=_generation_metrics,
            decode=_generation_decode,
            encode_target=lambda raw, spec: str(raw),
        ),
    )
}

LOWER_IS_BETTER = {"mse"}
PERCENT_METRICS = {"bleu", "chrf", "rouge_l", "exact"}  # reported 0-100 as sacrebleu does; 0-1 in objectives
