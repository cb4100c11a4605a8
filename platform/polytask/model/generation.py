"""The generation head: a transformers decoder that cross-attends to the shared encoder's states.

Two ways to get one (`head.decoder`):
  checkpoint  the encoder-decoder checkpoint's (T5, BART, Marian, ...) decoder and LM head: the
              seq2seq model with its encoder taken out (that encoder is the shared encoder);
  new         a fresh `BertLMHeadModel` (is_decoder, add_cross_attention) over the encoder
              tokenizer's vocabulary: start = CLS/BOS, end = SEP/EOS, pad = PAD.
Decoding is transformers' `generate` from precomputed encoder states, so greedy, beam search,
length penalty and n-gram blocking are the library's; polytask adds per-row length caps (a
`LogitsProcessor`) and a per-step callback that can stop early (a `StoppingCriteria`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from polytask.model.network import is_seq2seq_encoder, resolve_encoder_path
from polytask.tasks import IGNORE_INDEX, GenerationSpec, TaskSpec

CHECKPOINT, NEW = "checkpoint", "new"
ENCODER_INIT, RANDOM_INIT = "encoder", "random"
LAYER_ENDS = ("bottom", "top")
OnStep = Callable[[int, list[int | None], list[bool]], bool | set[int] | None]


def resolve_decoder(spec: TaskSpec, encoder: Any) -> TaskSpec:
    """The spec with `generation.decoder` decided (the checkpoint's own decoder when the encoder
    comes from an encoder-decoder checkpoint, else a new one) and, for a new one, `decoder_init`
    (warm-started from the encoder where its layout allows, else random). `encoder`: the encoder
    module, or just its config (then `decoder_init` stays as given)."""
    import dataclasses

    gen = spec.generation or GenerationSpec()
    config = getattr(encoder, "config", encoder)
    choice = gen.decoder or (CHECKPOINT if is_seq2seq_encoder(config) else NEW)
    init = gen.decoder_init
    if choice == NEW and init is None and isinstance(encoder, nn.Module):
        init = ENCODER_INIT if can_warm_start(encoder) else RANDOM_INIT
    return dataclasses.replace(spec, generation=dataclasses.replace(gen, decoder=choice, decoder_init=init))


class GenerationHead(nn.Module):
    """A decoder + LM head that reads the shared encoder's token states (never runs an encoder).

    `tokenizer` (not a parameter) turns ids into text; `source` is "checkpoint" or "new"."""

    def __init__(
        self,
        decoder: Any,
        source: str,
        tokenizer: Any,
        special: dict[str, int],
        label_prefix: Sequence[int] = (),
    ) -> None:
        """`label_prefix`: ids every target starts with after the decoder start token (BART's
        `<s>`, see `checkpoint_label_prefix`); the loss adds them and `generate` cuts them off."""
        super().__init__()
        self.decoder = decoder
        self.source = source
        self.tokenizer = tokenizer
        self.start_id = int(special["start"])
        self.eos_id = int(special["eos"])
        self.pad_id = int(special["pad"])
        self.label_prefix = [int(t) for t in label_prefix]
        self.new_parameters: set[str] = set()  # decoder parameters not copied from a checkpoint

    @property
    def special(self) -> dict[str, int]:
        return {"start": self.start_id, "eos": self.eos_id, "pad": self.pad_id}

    def forward(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        **generate_kwargs: Any,
    ) -> Any:
        """Teacher-forced logits (batch, target length, vocab) for `decoder_input_ids`; with
        `labels` (target ids padded with -100), (logits, loss) — EOS is appended here, so the
        head learns where to stop; with neither, `generate(self, states, mask, **generate_kwargs)`.
        All through `__call__`, so an FSDP unit around the head gathers its weights for each."""
        if labels is not None:
            from polytask.tasks import generation_loss

            labels = with_prefix(with_eos(labels, self.eos_id), self.label_prefix)
            logits = self(states, mask, shift_right(labels, self.start_id, self.pad_id))
            return logits, generation_loss(logits, labels, label_smoothing)
        if decoder_input_ids is None:
            return generate(self, states, mask, **generate_kwargs)
        if self.source == CHECKPOINT:
            from transformers.modeling_outputs import BaseModelOutput

            out = self.decoder(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                use_cache=False,
            )
        else:
            out = self.decoder(
                input_ids=decoder_input_ids,
                encoder_hidden_states=states,
                encoder_attention_mask=mask,
                use_cache=False,
            )
        return out.logits

    def target_ids(self, targets: Sequence[str], max_length: int) -> list[list[int]]:
        """Each target text as token ids, without specials (the loss adds EOS, the decoder
        start token plays CLS/BOS); what the data layer stores as a generation task's labels."""
        return target_ids(self.tokenizer, targets, max_length)

    def decoder_config(self) -> dict[str, Any]:
        """What head.json stores to rebuild this head without its checkpoint."""
        return {
            "source": self.source,
            "special": self.special,
            "label_prefix": self.label_prefix,
            "config": self.decoder.config.to_dict(),
        }


def target_ids(tokenizer: Any, targets: Sequence[str], max_length: int) -> list[list[int]]:
    """Target texts as token ids without specials, cut to `max_length` tokens."""
    enc = tokenizer(list(targets), add_special_tokens=False, truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


def with_eos(labels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each row's target ids followed by EOS (one column wider, still padded with -100)."""
    out = torch.cat([labels, labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    lengths = (labels != IGNORE_INDEX).sum(dim=1)
    out[torch.arange(labels.shape[0], device=labels.device), lengths] = eos_id
    return out


def with_prefix(labels: torch.Tensor, prefix: Sequence[int]) -> torch.Tensor:
    """`prefix` ids before each row's targets (nothing to do for an empty prefix)."""
    if not prefix:
        return labels
    head = torch.tensor(list(prefix), dtype=labels.dtype, device=labels.device)
    return torch.cat([head.expand(labels.shape[0], -1), labels], dim=1)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: start token, then the targets shifted one right."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


def pad_targets(ids: list[list[int]]) -> torch.Tensor:
    """Target id lists → one (batch, longest) tensor padded with -100 (ignored by the loss)."""
    width = max((len(x) for x in ids), default=1)
    out = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """start = CLS/BOS, eos = SEP/EOS, pad = PAD of an encoder tokenizer (for a new decoder)."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if start is None or eos is None or pad is None:
        raise ValueError(
            "head.decoder: new needs a tokenizer with a start (CLS or BOS), an end (SEP or EOS) "
            "and a PAD token; this encoder's tokenizer lacks one"
        )
    return {"start": int(start), "eos": int(eos), "pad": int(pad)}


def _seq2seq_special(config: Any, tokenizer: Any) -> dict[str, int]:
    start = config.decoder_start_token_id
    if start is None:
        start = config.bos_token_id if config.bos_token_id is not None else config.pad_token_id
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return {"start": int(start), "eos": int(eos), "pad": int(pad)}


def checkpoint_label_prefix(config: Any) -> list[int]:
    """Ids a checkpoint's decoder was pretrained to write first after its start token: BART
    (decoder start `</s>`, then `<s>`, then the text) — its generation config forces that `<s>`
    (`forced_bos_token_id`), so training keeps the convention instead of teaching the decoder
    a different first token. Other checkpoints (T5, Marian, ...) start the text right away."""
    if getattr(config, "model_type", None) == "bart" and config.bos_token_id is not None:
        return [int(config.bos_token_id)]
    return []


def _without_encoder(seq2seq: nn.Module) -> nn.Module:
    """The seq2seq model with its encoder replaced by a parameter-free stand-in: generation and
    the loss always pass `encoder_outputs`, so it never runs, and the head holds no encoder weights.
    Its token embeddings become the decoder's own copy (T5 and BART share one table)."""
    encoder = seq2seq.get_encoder()
    for name, module in seq2seq.named_modules():
        if module is encoder:
            parent = seq2seq.get_submodule(name.rpartition(".")[0]) if "." in name else seq2seq
            setattr(parent, name.rpartition(".")[2], _SharedEncoderStandIn())
            break
    return seq2seq


class _SharedEncoderStandIn(nn.Module):
    """Where the seq2seq model's encoder was: polytask's shared encoder runs outside the head."""

    main_input_name = "input_ids"  # generate() reads it before seeing encoder_outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the generation head runs from encoder states; pass encoder_outputs")


def build_generation_head(
    spec: TaskSpec, tokenizer: Any, encoder: nn.Module, checkpoint: str | None = None
) -> GenerationHead:
    """A head for a generation spec (`resolve_decoder` decides "checkpoint" or "new").

    checkpoint: `checkpoint` (a hub id, directory or package:) must be the encoder-decoder
    checkpoint the shared encoder came from. new: sized by the encoder (hidden size, heads) and
    the tokenizer (vocabulary); `tie_embeddings` starts its token embeddings (and the LM head,
    tied to them) as a copy of the encoder's."""
    spec = resolve_decoder(spec, encoder)
    gen = spec.generation
    if gen.decoder == CHECKPOINT:
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        path = resolve_encoder_path(checkpoint) if checkpoint else None
        if path is None or not getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False):
            raise ValueError(
                f"task '{spec.name}': head.decoder: checkpoint needs encoder.name_or_path to be an "
                f"encoder-decoder checkpoint (T5, BART, Marian, ...), got {checkpoint!r}; set "
                "head.decoder: new for a fresh decoder on this encoder"
            )
        seq2seq = AutoModelForSeq2SeqLM.from_pretrained(path)
        special = _seq2seq_special(seq2seq.config, tokenizer)
        prefix = checkpoint_label_prefix(seq2seq.config)
        return GenerationHead(_without_encoder(seq2seq), CHECKPOINT, tokenizer, special, prefix)
    from transformers import BertConfig, BertLMHeadModel

    enc_cfg = encoder.config
    hidden = int(enc_cfg.hidden_size)
    heads = int(getattr(enc_cfg, "num_attention_heads", 0) or 0)
    special = _special_ids(tokenizer)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=gen.decoder_layers,
        num_attention_heads=heads if heads and hidden % heads == 0 else 1,
        intermediate_size=int(getattr(enc_cfg, "intermediate_size", 4 * hidden)),
        hidden_act=getattr(enc_cfg, "hidden_act", "gelu"),
        layer_norm_eps=float(getattr(enc_cfg, "layer_norm_eps", 1e-12)),
        type_vocab_size=int(getattr(enc_cfg, "type_vocab_size", 2) or 2),
        max_position_embeddings=max(512, gen.max_new_tokens + 2),
        hidden_dropout_prob=spec.dropout,
        attention_probs_dropout_prob=spec.dropout,
        is_decoder=True,
        add_cross_attention=True,
        tie_word_embeddings=True,
        pad_token_id=special["pad"],
        bos_token_id=special["start"],
        eos_token_id=special["eos"],
        decoder_start_token_id=special["start"],
    )
    decoder = BertLMHeadModel(config)
    copied: set[str] = set()
    if gen.decoder_init == ENCODER_INIT:
        copied = warm_start(decoder, encoder, gen.decoder_layers_from, spec.name)
    elif gen.tie_embeddings:
        source = encoder.get_input_embeddings()
        if source is not None and tuple(source.weight.shape) == (config.vocab_size, hidden):
            with torch.no_grad():
                decoder.get_input_embeddings().weight.copy_(source.weight)
            copied = {"bert.embeddings.word_embeddings.weight"}
    head = GenerationHead(decoder, NEW, tokenizer, special)
    head.new_parameters = {n for n, _ in decoder.named_parameters()} - copied
    return head


def _encoder_layer_keys(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state with BERT's layout (`embeddings.*`, `encoder.layer.N.*`), or {}."""
    state = encoder.state_dict()
    layout = "embeddings.word_embeddings.weight" in state and "encoder.layer.0.attention.self.query.weight" in state
    return state if layout and getattr(encoder.config, "model_type", None) == "bert" else {}


def can_warm_start(encoder: nn.Module) -> bool:
    """Whether a new decoder can start from this encoder's weights: a BERT-layout encoder
    (BERT, MiniLM, ...), whose layers are a `BertLMHeadModel`'s minus cross-attention."""
    return bool(_encoder_layer_keys(encoder))


def warm_start(decoder: nn.Module, encoder: nn.Module, take: str, task: str) -> set[str]:
    """Copy the encoder's embeddings and its bottom (or top) `num_hidden_layers` layers into
    `decoder` (BERT2BERT warm-starting, Rothe et al. 2020: self-attention, FFN and layer norms
    from the encoder; cross-attention and the LM transform stay fresh; the LM head is tied to the
    copied word embeddings). Returns the decoder parameter names that were copied."""
    state = _encoder_layer_keys(encoder)
    if not state:
        raise ValueError(
            f"task '{task}': head.decoder_init: encoder needs a BERT-layout encoder (BERT, MiniLM, "
            f"...), not '{getattr(encoder.config, 'model_type', type(encoder).__name__)}'; set "
            "head.decoder_init: random"
        )
    n_enc = int(encoder.config.num_hidden_layers)
    n_dec = int(decoder.config.num_hidden_layers)
    if n_dec > n_enc:
        raise ValueError(
            f"task '{task}': head.decoder_layers is {n_dec} but the encoder has {n_enc} layers to "
            f"start from; set head.decoder_layers ≤ {n_enc} or head.decoder_init: random"
        )
    if take not in LAYER_ENDS:
        raise ValueError(f"task '{task}': head.decoder_layers_from must be one of {LAYER_ENDS}, got {take!r}")
    first = 0 if take == "bottom" else n_enc - n_dec
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("embeddings."):
            mapped[f"bert.{key}"] = value
        elif key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer.") :].split(".", 1)
            if first <= int(index) < first + n_dec:
                mapped[f"bert.encoder.layer.{int(index) - first}.{rest}"] = value
    own = decoder.state_dict()
    copied = set()
    with torch.no_grad():
        for key, value in mapped.items():
            target = own.get(key)
            if target is None or target.dim() != value.dim():
                continue
            if target.shape == value.shape:
                target.copy_(value)
            elif key.endswith("position_embeddings.weight") and target.shape[1:] == value.shape[1:]:
                rows = min(target.shape[0], value.shape[0])  # the decoder may allow more positions
                target[:rows].copy_(value[:rows])
            else:
                continue
            copied.add(key)
    return copied


def rebuild_generation_head(meta: dict[str, Any], tokenizer: Any) -> GenerationHead:
    """An untrained head of the shape head.json describes (its weights are loaded after)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, BertConfig, BertLMHeadModel

    source, cfg = meta["source"], dict(meta["config"])
    if source == CHECKPOINT:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        decoder = _without_encoder(AutoModelForSeq2SeqLM.from_config(config))
    else:
        cfg.pop("model_type", None)
        decoder = BertLMHeadModel(BertConfig(**cfg))
    return GenerationHead(decoder, source, tokenizer, meta["special"], meta.get("label_prefix", ()))


class _RowCaps:
    """LogitsProcessor: a row under its own minimum may not end (no EOS); a row that has generated
    its own cap of tokens, or that the step callback ended, may only end (EOS next)."""

    def __init__(
        self, caps: list[int], mins: list[int], num_beams: int, eos_id: int, prompt_length: int
    ) -> None:
        self.caps = torch.tensor(caps).repeat_interleave(num_beams)
        self.mins = torch.tensor(mins).repeat_interleave(num_beams)
        self.ended = torch.zeros(len(caps) * num_beams, dtype=torch.bool)
        self.eos_id = eos_id
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        produced = input_ids.shape[1] - self.prompt_length
        early = (produced < self.mins.to(scores.device)).unsqueeze(-1)
        no_eos = scores.clone()
        no_eos[:, self.eos_id] = float("-inf")
        scores = torch.where(early, no_eos, scores)
        at_cap = (produced >= self.caps.to(scores.device)) | self.ended.to(scores.device)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_id] = 0.0
        return torch.where(at_cap.unsqueeze(-1), forced, scores)


class _StepCallback:
    """StoppingCriteria (greedy): reports each step's tokens; `False` from `on_step` stops all,
    a set of row indices ends those rows (EOS at their next step) and lets the others go on."""

    def __init__(self, on_step: OnStep, eos_id: int, batch: int, caps: _RowCaps) -> None:
        self.on_step = on_step
        self.eos_id = eos_id
        self.caps = caps
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        new = input_ids[:, -1].cpu()
        tokens = [None if d else int(t) for t, d in zip(new.tolist(), self.done.tolist())]
        self.done = self.done | (new == self.eos_id)
        keep_going = self.on_step(self.step, tokens, self.done.tolist())
        self.step += 1
        if keep_going is False:
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if isinstance(keep_going, (set, frozenset, list, tuple)):
            for row in keep_going:
                self.caps.ended[int(row)] = True
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _Stop:
    """StoppingCriteria: every row (every beam) ends once `stop()` is true."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate(
    head: GenerationHead,
    encoder_states: torch.Tensor,
    encoder_mask: torch.Tensor,
    *,
    max_new_tokens: int | Sequence[int] = 64,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int | Sequence[int] = 0,
    on_step: OnStep | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[list[int]]:
    """Token ids per row (no start token, cut before EOS) from padded encoder states.

    `max_new_tokens`: one cap, or one per row; `min_new_tokens` (one, or one per row, at most the
    row's cap): no EOS before that many tokens (a benchmark decodes a fixed length this way).
    `on_step(step, tokens, finished)` (greedy only) is called after every decoding step with each
    row's new token id (None once a row has finished; EOS is reported) and which rows have
    finished; returning False stops every row there (the ids so far are returned), returning a
    set of row indices ends just those rows (a streaming client went away). `stop()` true ends
    every row at the next step, beam search included (its caller was cancelled)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    batch = encoder_states.shape[0]
    one_cap = isinstance(max_new_tokens, numbers.Integral)
    caps = [int(max_new_tokens)] * batch if one_cap else [int(c) for c in max_new_tokens]
    if len(caps) != batch:
        raise ValueError(f"max_new_tokens has {len(caps)} caps for {batch} rows; give one per row")
    if min(caps, default=1) < 1:
        raise ValueError("max_new_tokens must be at least 1 for every row")
    mins = [int(min_new_tokens)] * batch if isinstance(min_new_tokens, int) else [int(m) for m in min_new_tokens]
    if len(mins) != batch or any(m > c for m, c in zip(mins, caps)):
        raise ValueError("min_new_tokens: give one (or one per row), each at most its row's max_new_tokens")
    if on_step is not None and num_beams > 1:
        raise ValueError("on_step streams greedy decoding only; use num_beams: 1 to stream")
    config = GenerationConfig(
        # room for the label prefix (BART's <s>) and the EOS a capped row is forced to end with
        max_new_tokens=max(caps) + 1 + len(head.label_prefix),
        num_beams=num_beams,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        do_sample=False,
        early_stopping=num_beams > 1,
        decoder_start_token_id=head.start_id,
        bos_token_id=head.start_id,
        eos_token_id=head.eos_id,
        pad_token_id=head.pad_id,
    )
    mask = encoder_mask.to(encoder_states.device)
    row_caps = _RowCaps(caps, mins, num_beams, head.eos_id, prompt_length=1 + len(head.label_prefix))
    processors = LogitsProcessorList([row_caps])
    callback = _StepCallback(on_step, head.eos_id, batch, row_caps) if on_step is not None else None
    stopping = StoppingCriteriaList([callback] if callback else [])
    if stop is not None:
        stopping.append(_Stop(stop))
    if head.source == CHECKPOINT:
        from transformers.modeling_outputs import BaseModelOutput

        out = head.decoder.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
            attention_mask=mask,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=stopping,
        )
    else:
        from transformers import DynamicCache, EncoderDecoderCache

        start = torch.full((batch, 1), head.start_id, dtype=torch.long, device=encoder_states.device)
        cfg = head.decoder.config
        out = head.decoder.generate(
            cache=EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg)),  # + cross-attention
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=mask,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=stopping,
        )
    rows = []
    prefix = head.label_prefix
    for ids in out[:, 1:].tolist():
        ids = ids[len(prefix) :] if prefix and ids[: len(prefix)] == prefix else ids
        cut = ids.index(head.eos_id) if head.eos_id in ids else len(ids)
        rows.append([t for t in ids[:cut] if t != head.pad_id])
    return rows


def generate_text(head: GenerationHead, encoder_states: torch.Tensor, encoder_mask: torch.Tensor, **kw: Any) -> list[str]:
    """`generate`, decoded to text with the encoder's tokenizer (special tokens dropped)."""
    ids = generate(head, encoder_states, encoder_mask, **kw)
    return head.tokenizer.batch_decode(ids, skip_special_tokens=True)


def generation_settings(spec: TaskSpec, **overrides: Any) -> dict[str, Any]:
    """The task's decoding settings as `generate` keywords; `overrides` (not None) win."""
    gen = spec.generation or GenerationSpec()
    settings = {
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": gen.num_beams,
        "length_penalty": gen.length_penalty,
        "no_repeat_ngram_size": gen.no_repeat_ngram_size,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings
