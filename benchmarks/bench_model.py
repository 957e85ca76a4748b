#!/usr/bin/env python
"""Speed and memory of CMAL against plain transformers references, measured side by side in one process.

Sections (all on CPU, `torch.set_num_threads(--threads)` for every measurement, subprocesses included):

* ``train``  — one pre-training step (forward + backward, `zero_grad(set_to_none=True)` first) of
  `CmalForPreTraining` with every objective on (AMC at 3-6 anchors per caption with collator-like actions, MLM on
  15 % of the non-anchor pieces, ITM), against
  (a) `VisualBertForPreTraining` at equal width and equal *total* depth (text + visual + unified layers), over the
      concatenated text + region sequence, MLM over all positions and its sentence-image head, and
  (b) the *bare stack*: transformers `BertEncoder`s in CMAL's three stages (text over N pieces, regions over M,
      unified over N + M), an input projection for the region features, MLM at the masked positions and ITM; no
      anchors, boxes or hyperspheres. It is the reference for "what would the plain transformer cost".
* ``infer``  — `torch.inference_mode()` latency (batch 1) and throughput (batch 32) of `CmalModel` and
  `CmalForQuestionAnswering` (3129 answers) against `VisualBertModel` and the bare stack's forward.
* ``memory`` — peak memory of the training step with and without gradient checkpointing, one fresh subprocess
  per configuration (see `memory_child` for the method).
* ``attn``   — CMAL with `attn_implementation="sdpa"` (the default) against `"eager"`, same weights, end to end,
  and the attention functions alone at the model's shapes (see `attention_only_ms`).

Timing: every case gets warm-up calls, then the cases run interleaved (round robin, rotating the order) and each
reports the median of its timed calls (`time.perf_counter`). Ratios: median over median, the median of the
per-round ratios ("paired", on which the targets are checked: drifts of the machine's speed cancel within a round)
and min over min.

    python benchmarks/bench_model.py --quick      # small shapes, < 1 minute on idle cores
    python benchmarks/bench_model.py              # base shapes (768 / 12 heads / 3072, 6+3+6 layers), 8-10 min
    python benchmarks/bench_model.py --sections train,attn --json results.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import HfArgumentParser, VisualBertConfig, VisualBertForPreTraining, VisualBertModel  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402
from transformers.masking_utils import create_bidirectional_mask  # noqa: E402
from transformers.models.bert.modeling_bert import (  # noqa: E402
    BertConfig,
    BertEmbeddings,
    BertEncoder,
    BertLMPredictionHead,
    BertPooler,
)

SECTIONS = ("train", "infer", "memory", "attn")
CLS_ID, SEP_ID, MASK_ID, FIRST_WORD_ID = 101, 102, 103, 1000
ACTION_RATES = (0.1, 0.4, 0.4, 0.1)  # keep, fill text, fill region, mask both (CmalConfig defaults)
NUM_VQA_ANSWERS = 3129

# Targets of issue 8 (on this CPU).
TARGET_VS_BARE = 1.10
TARGET_VS_VISUALBERT = 0.90
TARGET_CHECKPOINTING_SAVING = 0.40


@dataclass(frozen=True)
class Shapes:
    """Model widths and input shapes of one benchmark mode."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_text_layers: int
    num_visual_layers: int
    num_unified_layers: int
    visual_feat_dim: int
    num_regions: int
    min_pieces: int
    max_pieces: int
    train_batches: tuple[int, ...]
    infer_batches: tuple[int, ...]
    memory_batch: int
    attn_train_batch: int
    # (warm-up calls, timed calls) per kind ("train", "infer") and batch size; the largest batch-size key not above
    # the batch size applies.
    iterations: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    attention_repetitions: int = 100
    vocab_size: int = 30522
    min_anchors: int = 3
    max_anchors: int = 6

    @property
    def total_layers(self) -> int:
        return self.num_text_layers + self.num_visual_layers + self.num_unified_layers

    def warmup_and_iterations(self, kind: str, batch_size: int) -> tuple[int, int]:
        table = self.iterations[kind]
        return table[max(key for key in table if key <= batch_size)]


FULL = Shapes(
    hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_text_layers=6, num_visual_layers=3,
    num_unified_layers=6, visual_feat_dim=2048, num_regions=36, min_pieces=20, max_pieces=40,
    train_batches=(8, 32), infer_batches=(1, 32), memory_batch=32, attn_train_batch=8,
    iterations={"train": {1: (1, 5), 32: (1, 3)}, "infer": {1: (3, 20), 8: (1, 5)}},
)
QUICK = Shapes(
    hidden_size=128, num_attention_heads=4, intermediate_size=512, num_text_layers=2, num_visual_layers=1,
    num_unified_layers=2, visual_feat_dim=256, num_regions=10, min_pieces=8, max_pieces=16,
    train_batches=(2, 8), infer_batches=(1, 8), memory_batch=64, attn_train_batch=8,
    iterations={"train": {1: (1, 3)}, "infer": {1: (2, 8)}}, attention_repetitions=40,
)


def import_cmal(cmal_root: str | None):
    """Imports the installed `modeling_cmal`, or the one in `--cmal-root` (a folder holding a patched copy of the
    package, to measure a proposed change against the same references: that folder goes first on the path)."""
    if cmal_root:
        sys.path.insert(0, str(Path(cmal_root).resolve()))
    import modeling_cmal

    return modeling_cmal


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def make_batch(shapes: Shapes, batch_size: int, num_anchor_concepts: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded pre-training batch as the CMAL collator gives it.

    Captions of `min_pieces..max_pieces` pieces (`[CLS] ... [SEP]`, padded to `max_pieces`), `num_regions` regions,
    3-6 anchors per caption (words of one or two pieces, distinct regions) with actions drawn at the config's rates,
    MLM on 15 % of the non-anchor pieces (80 / 10 / 10), ITM labels half matched.
    """
    generator = torch.Generator().manual_seed(seed)
    length = shapes.max_pieces
    input_ids = torch.zeros(batch_size, length, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    labels = torch.full((batch_size, length), -100, dtype=torch.long)
    anchor_rows: list[list[tuple[int, int, int, int]]] = []
    for b in range(batch_size):
        num_pieces = int(torch.randint(shapes.min_pieces, shapes.max_pieces + 1, (), generator=generator))
        input_ids[b, :num_pieces] = torch.randint(FIRST_WORD_ID, shapes.vocab_size, (num_pieces,), generator=generator)
        input_ids[b, 0], input_ids[b, num_pieces - 1] = CLS_ID, SEP_ID
        attention_mask[b, :num_pieces] = 1

        num_anchors = int(torch.randint(shapes.min_anchors, shapes.max_anchors + 1, (), generator=generator))
        regions = torch.randperm(shapes.num_regions, generator=generator)[:num_anchors].tolist()
        concepts = torch.randint(num_anchor_concepts, (num_anchors,), generator=generator).tolist()
        used: set[int] = set()
        words: list[list[int]] = []
        for start in torch.randperm(num_pieces - 2, generator=generator).add(1).tolist():
            if len(words) == len(regions):
                break
            word = [start, start + 1] if torch.rand((), generator=generator) < 0.3 else [start]
            if word[-1] > num_pieces - 2 or used.intersection(word):
                continue
            used.update(word)
            words.append(word)
        rows = []
        for index, word in enumerate(words):
            action = int(torch.multinomial(torch.tensor(ACTION_RATES), 1, generator=generator))
            rows += [(piece, regions[index], action, concepts[index]) for piece in word]
        anchor_rows.append(rows)

        candidates = [p for p in range(1, num_pieces - 1) if p not in used]
        chosen = [p for p in candidates if torch.rand((), generator=generator) < 0.15]
        for piece in chosen:
            labels[b, piece] = input_ids[b, piece]
            draw = float(torch.rand((), generator=generator))
            if draw < 0.8:
                input_ids[b, piece] = MASK_ID
            elif draw < 0.9:
                input_ids[b, piece] = int(torch.randint(FIRST_WORD_ID, shapes.vocab_size, (), generator=generator))

    num_rows = max(len(rows) for rows in anchor_rows)
    anchor_pairs = torch.full((batch_size, num_rows, 2), -1, dtype=torch.long)
    anchor_actions = torch.zeros(batch_size, num_rows, dtype=torch.long)
    anchor_concept_ids = torch.zeros(batch_size, num_rows, dtype=torch.long)
    for b, rows in enumerate(anchor_rows):
        for k, (piece, region, action, concept) in enumerate(rows):
            anchor_pairs[b, k] = torch.tensor([piece, region])
            anchor_actions[b, k], anchor_concept_ids[b, k] = action, concept

    corners = torch.rand(batch_size, shapes.num_regions, 2, 2, generator=generator)
    visual_pos = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        # BUTD region features are non-negative (post-ReLU pooled CNN features).
        "visual_feats": torch.rand(batch_size, shapes.num_regions, shapes.visual_feat_dim, generator=generator),
        "visual_pos": visual_pos,
        "visual_attention_mask": torch.ones(batch_size, shapes.num_regions, dtype=torch.long),
        "anchor_pairs": anchor_pairs,
        "anchor_concept_ids": anchor_concept_ids,
        "anchor_actions": anchor_actions,
        "labels": labels,
        # As the pre-training collator gives them: the vocabulary decoder runs at the masked pieces only.
        "mlm_positions": sys.modules["modeling_cmal"].collator_cmal.mlm_prediction_positions(labels),
        "itm_labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }


def cmal_inference_inputs(batch: dict) -> dict:
    """Trunk inputs at inference: anchors from the processor, default action (keep), no targets."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask",
            "anchor_pairs", "anchor_concept_ids")
    return {key: batch[key] for key in keys}


def visual_bert_inputs(batch: dict, with_targets: bool) -> dict:
    """The same batch for VisualBERT: regions appended to the text; MLM labels over the whole sequence."""
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "token_type_ids": batch["token_type_ids"],
        "visual_embeds": batch["visual_feats"],
        "visual_attention_mask": batch["visual_attention_mask"],
        "visual_token_type_ids": torch.ones_like(batch["visual_attention_mask"]),
    }
    if with_targets:
        region_labels = torch.full(batch["visual_attention_mask"].shape, -100, dtype=torch.long)
        inputs["labels"] = torch.cat([batch["labels"], region_labels], dim=1)
        inputs["sentence_image_labels"] = batch["itm_labels"]
    return inputs


def bare_inputs(batch: dict, with_targets: bool) -> dict:
    keys = ("input_ids", "attention_mask", "visual_feats", "visual_attention_mask")
    inputs = {key: batch[key] for key in keys}
    if with_targets:
        inputs.update(labels=batch["labels"], itm_labels=batch["itm_labels"])
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Reference models
# --------------------------------------------------------------------------------------------------------------


def bert_config(shapes: Shapes, num_layers: int) -> BertConfig:
    return BertConfig(
        vocab_size=shapes.vocab_size, hidden_size=shapes.hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=shapes.num_attention_heads, intermediate_size=shapes.intermediate_size,
        attn_implementation="sdpa",
    )


class BareStack(nn.Module):
    """Plain transformers BERT layers in CMAL's three stages: `BertEmbeddings` + text `BertEncoder` over the pieces,
    `LN(Linear(features))` + region `BertEncoder` over the regions, unified `BertEncoder` over their concatenation,
    `BertPooler`. With `pretraining_heads`: an MLM head at the labelled positions (decoder tied to the word
    embeddings, as CMAL's) and a linear ITM head; `forward` then returns the summed loss."""

    def __init__(self, shapes: Shapes, pretraining_heads: bool):
        super().__init__()
        config = bert_config(shapes, shapes.num_text_layers)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.text_encoder = BertEncoder(config)
        self.visual_projection = nn.Linear(shapes.visual_feat_dim, shapes.hidden_size)
        self.visual_layer_norm = nn.LayerNorm(shapes.hidden_size, eps=config.layer_norm_eps)
        self.visual_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.visual_encoder = BertEncoder(bert_config(shapes, shapes.num_visual_layers))
        self.unified_encoder = BertEncoder(bert_config(shapes, shapes.num_unified_layers))
        self.pooler = BertPooler(config)
        self.mlm_head = BertLMPredictionHead(config) if pretraining_heads else None
        self.itm_head = nn.Linear(shapes.hidden_size, 2) if pretraining_heads else None
        if pretraining_heads:
            self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask, visual_feats, visual_attention_mask, labels=None, itm_labels=None):
        text = self.embeddings(input_ids=input_ids)
        text = self.text_encoder(text, create_bidirectional_mask(self.config, text, attention_mask)).last_hidden_state
        regions = self.visual_dropout(self.visual_layer_norm(self.visual_projection(visual_feats)))
        regions = self.visual_encoder(
            regions, create_bidirectional_mask(self.config, regions, visual_attention_mask)
        ).last_hidden_state
        hybrid = torch.cat([text, regions], dim=1)
        hybrid_mask = create_bidirectional_mask(
            self.config, hybrid, torch.cat([attention_mask, visual_attention_mask], dim=1)
        )
        sequence_output = self.unified_encoder(hybrid, hybrid_mask).last_hidden_state
        pooled_output = self.pooler(sequence_output)
        if labels is None:
            return sequence_output, pooled_output
        text_output = sequence_output[:, : input_ids.shape[1]]
        labelled = labels != -100
        mlm_loss = F.cross_entropy(self.mlm_head(text_output[labelled]).float(), labels[labelled])
        itm_loss = F.cross_entropy(self.itm_head(pooled_output).float(), itm_labels)
        return mlm_loss + itm_loss


def visual_bert_config(shapes: Shapes) -> VisualBertConfig:
    return VisualBertConfig(
        vocab_size=shapes.vocab_size, hidden_size=shapes.hidden_size, num_hidden_layers=shapes.total_layers,
        num_attention_heads=shapes.num_attention_heads, intermediate_size=shapes.intermediate_size,
        visual_embedding_dim=shapes.visual_feat_dim,
    )


def cmal_config(cmal, shapes: Shapes, **kwargs):
    return cmal.CmalConfig(
        vocab_size=shapes.vocab_size, hidden_size=shapes.hidden_size, num_attention_heads=shapes.num_attention_heads,
        intermediate_size=shapes.intermediate_size, num_text_layers=shapes.num_text_layers,
        num_visual_layers=shapes.num_visual_layers, num_unified_layers=shapes.num_unified_layers,
        visual_feat_dim=shapes.visual_feat_dim, **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def training_step(model: nn.Module, inputs: dict) -> Callable[[], None]:
    """Forward + backward of the total loss; gradients are set to None first, as an optimizer's `zero_grad` does."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        output = model(**inputs)
        loss = output if isinstance(output, torch.Tensor) else output.loss
        loss.backward()

    return step


def inference_call(model: nn.Module, inputs: dict) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            model(**inputs)

    return call


def time_interleaved(
    cases: dict[str, Callable[[], None]], warmup: int, iterations: int, *, collect_garbage: bool = True
) -> dict[str, dict]:
    """Warm-up calls per case, then `iterations` rounds over all cases (order rotated each round; garbage collected
    outside the timed region unless `collect_garbage=False`, for calls of a few ms). Returns per case the median,
    min and max in ms and all samples."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(iterations):
        rotation = round_index % len(names)
        for name in names[rotation:] + names[:rotation]:
            if collect_garbage:
                gc.collect()
            start = time.perf_counter()
            cases[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
               "samples_ms": values}
        for name, values in samples.items()
    }


def print_timings(title: str, timings: dict[str, dict], reference_names: list[str], subject_names: list[str],
                  batch_size: int) -> list[dict]:
    """Prints a table of the cases and the subject/reference ratios; returns the ratio rows.

    Three estimates of the ratio: `ratio`, median over median; `paired`, the median of the per-round ratios
    (subject and reference timed back to back in the same round, so slow drifts of the machine's speed cancel; the
    targets are checked on it), printed with the range of the per-round ratios; `min`, min over min (noise only
    adds time, so the minima approach the intrinsic cost)."""
    print(f"\n{title}")
    for name, timing in timings.items():
        per_sample = timing["median_ms"] / batch_size
        print(f"  {name:<44} median {timing['median_ms']:10.1f} ms   (min {timing['min_ms']:.1f}, "
              f"max {timing['max_ms']:.1f}; {per_sample:.1f} ms/sample)")
    rows = []
    for subject in subject_names:
        for reference in reference_names:
            ratio = timings[subject]["median_ms"] / timings[reference]["median_ms"]
            per_round = [a / b for a, b in zip(timings[subject]["samples_ms"], timings[reference]["samples_ms"])]
            rows.append({"subject": subject, "reference": reference, "ratio": ratio, "batch_size": batch_size,
                         "paired_ratio": statistics.median(per_round), "paired_range": [min(per_round), max(per_round)],
                         "min_ratio": timings[subject]["min_ms"] / timings[reference]["min_ms"],
                         "subject_ms": timings[subject]["median_ms"], "reference_ms": timings[reference]["median_ms"],
                         "subject_samples_ms": timings[subject]["samples_ms"],
                         "reference_samples_ms": timings[reference]["samples_ms"]})
            print(f"  ratio {subject} / {reference}: {ratio:.3f}   paired {statistics.median(per_round):.3f} (range "
                  f"{min(per_round):.3f}-{max(per_round):.3f})   min {rows[-1]['min_ratio']:.3f}")
    return rows


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


def run_train(cmal, shapes: Shapes) -> list[dict]:
    torch.manual_seed(0)
    models = {
        "CmalForPreTraining": cmal.CmalForPreTraining(cmal_config(cmal, shapes)),
        f"VisualBertForPreTraining ({shapes.total_layers} layers)": VisualBertForPreTraining(
            visual_bert_config(shapes)
        ),
        "bare stack (BertEncoder x3 + MLM + ITM)": BareStack(shapes, pretraining_heads=True),
    }
    cmal_name, visual_bert_name, bare_name = models
    for model in models.values():
        model.train()
    rows = []
    for batch_size in shapes.train_batches:
        batch = make_batch(shapes, batch_size, models[cmal_name].config.num_anchor_concepts)
        cases = {
            cmal_name: training_step(models[cmal_name], batch),
            visual_bert_name: training_step(models[visual_bert_name], visual_bert_inputs(batch, with_targets=True)),
            bare_name: training_step(models[bare_name], bare_inputs(batch, with_targets=True)),
        }
        timings = time_interleaved(cases, *shapes.warmup_and_iterations("train", batch_size))
        anchors = int((batch["anchor_pairs"][..., 0] >= 0).sum())
        masked = int((batch["labels"] != -100).sum())
        title = (f"[train] pre-training step (forward + backward), batch {batch_size}: {shapes.max_pieces} pieces "
                 f"(padded), {shapes.num_regions} regions, {anchors} anchor rows, {masked} MLM labels")
        rows += [dict(row, section="train") for row in
                 print_timings(title, timings, [bare_name, visual_bert_name], [cmal_name], batch_size)]
    return rows


def run_infer(cmal, shapes: Shapes) -> list[dict]:
    torch.manual_seed(0)
    models = {
        "CmalModel": cmal.CmalModel(cmal_config(cmal, shapes)),
        f"CmalForQuestionAnswering ({NUM_VQA_ANSWERS} answers)": cmal.CmalForQuestionAnswering(
            cmal_config(cmal, shapes, num_labels=NUM_VQA_ANSWERS)
        ),
        f"VisualBertModel ({shapes.total_layers} layers)": VisualBertModel(visual_bert_config(shapes)),
        "bare stack forward": BareStack(shapes, pretraining_heads=False),
    }
    trunk_name, vqa_name, visual_bert_name, bare_name = models
    for model in models.values():
        model.eval()
    rows = []
    for batch_size in shapes.infer_batches:
        batch = make_batch(shapes, batch_size, models[trunk_name].config.num_anchor_concepts, seed=1)
        cases = {
            trunk_name: inference_call(models[trunk_name], cmal_inference_inputs(batch)),
            vqa_name: inference_call(models[vqa_name], cmal_inference_inputs(batch)),
            visual_bert_name: inference_call(models[visual_bert_name], visual_bert_inputs(batch, with_targets=False)),
            bare_name: inference_call(models[bare_name], bare_inputs(batch, with_targets=False)),
        }
        timings = time_interleaved(cases, *shapes.warmup_and_iterations("infer", batch_size))
        kind = "latency" if batch_size == 1 else "throughput"
        title = f"[infer] inference_mode forward, batch {batch_size} ({kind})"
        rows += [dict(row, section="infer") for row in
                 print_timings(title, timings, [bare_name, visual_bert_name], [trunk_name, vqa_name], batch_size)]
        if batch_size > 1:
            for name, timing in timings.items():
                print(f"  throughput {name}: {batch_size / timing['median_ms'] * 1e3:.1f} samples/s")
    return rows


def attention_only_ms(cmal, model, batch: dict, training: bool, repetitions: int) -> dict[str, float]:
    """Time of the attention function alone, per model call, under each implementation: transformers' sdpa
    interface and CMAL's eager function, called the way `CmalSelfAttention` calls them (query/key/value as
    `[B, heads, L, d]` views of `[B, L, H]` projections, the masks `create_bidirectional_mask` builds for that
    implementation, the output reshaped back), at the text, region and unified lengths of `batch`, forward only
    (inference) or forward + backward with attention dropout (training). Interleaved and repeated many times, it
    resolves what the end-to-end times cannot on a noisy machine. Returns ms per model call (summed over layers)
    from the medians (`"sdpa"`, `"eager"`) and from the minima (`"sdpa_min"`, `"eager_min"`: the intrinsic cost,
    since noise only adds)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    attention = model.cmal.unified_encoder.layer[0].attention.self
    if attention.training != training:
        raise ValueError(f"the model must be in {'train' if training else 'eval'} mode")
    batch_size = batch["input_ids"].shape[0]
    heads, head_size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    stages = (  # (layers, padding mask [B, L])
        (config.num_text_layers, batch["attention_mask"]),
        (config.num_visual_layers, batch["visual_attention_mask"]),
        (config.num_unified_layers, torch.cat([batch["attention_mask"], batch["visual_attention_mask"]], dim=1)),
    )
    functions = {"sdpa": ALL_ATTENTION_FUNCTIONS["sdpa"], "eager": cmal.modeling_cmal.eager_attention_forward}
    calls: dict[str, list[tuple[int, Callable[[], None]]]] = {name: [] for name in functions}
    for implementation, function in functions.items():
        model.set_attn_implementation(implementation)
        for num_layers, padding_mask in stages:
            length = padding_mask.shape[1]
            projections = [torch.randn(batch_size, length, config.hidden_size, requires_grad=training) for _ in "qkv"]
            mask = create_bidirectional_mask(config, projections[0], padding_mask)

            def call(function=function, projections=projections, mask=mask, length=length) -> None:
                query, key, value = (x.view(batch_size, length, heads, head_size).transpose(1, 2) for x in projections)
                output, _ = function(attention, query, key, value, mask, scaling=attention.scaling,
                                     dropout=config.attention_probs_dropout_prob if training else 0.0)
                output = output.reshape(batch_size, length, -1).contiguous()
                if training:
                    output.sum().backward()

            calls[implementation].append((num_layers, call))
    totals = {key: 0.0 for name in functions for key in (name, f"{name}_min")}
    with torch.inference_mode(not training):
        for index in range(len(stages)):
            cases = {name: calls[name][index][1] for name in functions}
            timings = time_interleaved(cases, warmup=3, iterations=repetitions, collect_garbage=False)
            for name in functions:
                totals[name] += calls[name][index][0] * timings[name]["median_ms"]
                totals[f"{name}_min"] += calls[name][index][0] * timings[name]["min_ms"]
    return totals


def run_attn(cmal, shapes: Shapes) -> list[dict]:
    """The same CMAL weights under eager and sdpa attention (switched with `set_attn_implementation`)."""
    with torch.device("meta"):  # the resolution happens in the constructor; no need to allocate the weights
        default = cmal.CmalModel(cmal.CmalConfig()).config._attn_implementation
    print(f"\n[attn] CmalModel(CmalConfig()) resolves config._attn_implementation to {default!r}")
    rows = [{"section": "attn", "subject": "default attn_implementation", "value": default}]
    torch.manual_seed(0)
    model = cmal.CmalForPreTraining(cmal_config(cmal, shapes))

    def switched(implementation: str, function: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            model.set_attn_implementation(implementation)
            function()

        return call

    def compare(title: str, function_of_model: Callable[[], Callable[[], None]], kind: str, batch_size: int) -> None:
        cases = {f"{title} {impl}": switched(impl, function_of_model()) for impl in ("sdpa", "eager")}
        timings = time_interleaved(cases, *shapes.warmup_and_iterations(kind, batch_size))
        sdpa_name, eager_name = cases
        section_rows = print_timings(f"[attn] {title}, batch {batch_size}", timings, [eager_name], [sdpa_name],
                                     batch_size)
        alone = attention_only_ms(cmal, model, batch_of[batch_size], kind == "train", shapes.attention_repetitions)
        difference = alone["sdpa"] - alone["eager"]
        print(f"  attention alone, per call (all layers, isolated, {shapes.attention_repetitions} interleaved "
              f"repetitions): median sdpa {alone['sdpa']:.1f} ms, eager {alone['eager']:.1f} ms, ratio "
              f"{alone['sdpa'] / alone['eager']:.3f} (difference {difference:+.1f} ms = "
              f"{difference / timings[eager_name]['median_ms']:+.1%} of the end-to-end call); min sdpa "
              f"{alone['sdpa_min']:.1f} ms, eager {alone['eager_min']:.1f} ms, ratio "
              f"{alone['sdpa_min'] / alone['eager_min']:.3f}")
        for row in section_rows:
            rows.append(dict(row, section="attn", attention_alone_ms=alone))

    batch_of = {batch_size: make_batch(shapes, batch_size, model.config.num_anchor_concepts, seed=2 + batch_size)
                for batch_size in (shapes.attn_train_batch, *shapes.infer_batches)}
    model.train()
    training_batch = batch_of[shapes.attn_train_batch]
    compare("CmalForPreTraining training step", lambda: training_step(model, training_batch), "train",
            shapes.attn_train_batch)
    model.eval()
    for batch_size in shapes.infer_batches:
        inputs = cmal_inference_inputs(batch_of[batch_size])
        compare("CmalModel inference_mode forward", lambda: inference_call(model.cmal, inputs), "infer", batch_size)
    model.set_attn_implementation(default)
    return rows


def _proc_status_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def memory_child(spec: dict) -> dict:
    """Runs in a fresh interpreter: peak memory of one CMAL training step (batch `spec["batch_size"]`).

    After one warm-up step (one-time allocations: oneDNN/MKL scratch, lazily built buffers), with gradients set to
    None before every step as an optimizer's `zero_grad` does, two measurements of the same step:

    * `torch_peak_bytes` (the figure the target is checked on) — replay of the CPU allocator's events recorded by
      `torch.profiler(profile_memory=True)` during one step: the maximum over time of the bytes allocated by torch
      and not yet freed, counted from the start of the step. Weights and inputs, alive before, are excluded;
      activations saved for backward, gradients and temporaries are included. It is exact and does not depend on
      what malloc keeps or returns to the OS. (`tracemalloc` cannot see torch's allocations; `torch.cuda` memory
      statistics do not exist for the CPU.)
    * `rss_peak_delta_bytes` — the process's view: `malloc_trim(0)` and a reset of the peak resident set size
      (`/proc/self/clear_refs` = 5), then VmHWM after the step minus VmRSS before it. It includes malloc's
      fragmentation and caching, so it is an upper bound of the former.

    Two more steps are timed without the profiler (median).
    """
    torch.set_num_threads(spec["threads"])
    cmal = import_cmal(spec["cmal_root"])
    shapes = QUICK if spec["quick"] else FULL
    torch.manual_seed(0)
    model = cmal.CmalForPreTraining(cmal_config(cmal, shapes))
    if spec["checkpointing"]:
        model.activation_checkpointing_enable()
    model.train()
    batch = make_batch(shapes, spec["batch_size"], model.config.num_anchor_concepts, seed=4)
    step = training_step(model, batch)
    step()

    def settle() -> None:
        model.zero_grad(set_to_none=True)
        gc.collect()

    settle()
    rss_delta = None
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        rss_before = _proc_status_bytes("VmRSS")
        step()
        rss_delta = _proc_status_bytes("VmHWM") - rss_before
        settle()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)

    step_ms = []
    for _ in range(2):
        settle()
        start = time.perf_counter()
        step()
        step_ms.append((time.perf_counter() - start) * 1e3)
    return {
        "checkpointing": spec["checkpointing"],
        "batch_size": spec["batch_size"],
        "torch_peak_bytes": peak,
        "rss_peak_delta_bytes": rss_delta,
        "step_ms": statistics.median(step_ms),
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


def run_memory(args, shapes: Shapes) -> list[dict]:
    batch_size = shapes.memory_batch
    print(f"\n[memory] CmalForPreTraining training step, batch {batch_size}, one fresh subprocess per configuration")
    print("  torch peak: max over one step of the bytes allocated by torch and not yet freed (allocator events of "
          "torch.profiler(profile_memory=True)),\n  above what was alive before the step (weights, inputs). RSS peak: "
          "VmHWM - VmRSS around the same step after malloc_trim and a peak reset (includes malloc caching).")
    results = {}
    for checkpointing in (False, True):
        spec = {"checkpointing": checkpointing, "batch_size": batch_size, "threads": args.threads,
                "quick": args.quick, "cmal_root": args.cmal_root}
        completed = subprocess.run(
            [sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            raise RuntimeError(f"memory subprocess failed ({spec}):\n{completed.stderr[-4000:]}")
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        results[checkpointing] = result
        label = "with gradient checkpointing" if checkpointing else "without gradient checkpointing"
        rss = result["rss_peak_delta_bytes"]
        rss_text = "n/a" if rss is None else f"{rss / 2**20:8.0f} MiB"
        print(f"  {label:<32} torch peak {result['torch_peak_bytes'] / 2**20:8.0f} MiB   RSS peak {rss_text}   "
              f"step {result['step_ms']:.0f} ms")
    saving = 1 - results[True]["torch_peak_bytes"] / results[False]["torch_peak_bytes"]
    rss_saving = None
    if results[False]["rss_peak_delta_bytes"]:
        rss_saving = 1 - results[True]["rss_peak_delta_bytes"] / results[False]["rss_peak_delta_bytes"]
    slowdown = results[True]["step_ms"] / results[False]["step_ms"]
    gradients = results[False]["num_parameters"] * 4
    rss_text = "n/a" if rss_saving is None else f"{rss_saving:.1%}"
    print(f"  gradient checkpointing cuts the torch peak by {saving:.1%} (RSS peak by {rss_text}); step time "
          f"x{slowdown:.2f}. Both peaks include the fp32 gradients ({gradients / 2**20:.0f} MiB), which no "
          "checkpointing removes.")
    return [{"section": "memory", "batch_size": batch_size, "without": results[False], "with": results[True],
             "saving": saving, "rss_saving": rss_saving, "slowdown": slowdown}]


# --------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict], args, load: tuple[float, float]) -> None:
    """Target checks and a markdown table for benchmarks/PERFORMANCE.md."""
    print("\n" + "=" * 100)
    print("Targets" + (" (quick shapes: a smoke test, the targets are defined on the full mode's base shapes)"
                       if args.quick else ""))
    for row in rows:
        if row["section"] == "train":
            target = TARGET_VS_BARE if row["reference"].startswith("bare") else TARGET_VS_VISUALBERT
            verdict = "PASS" if row["paired_ratio"] <= target else "FAIL"
            print(f"  {verdict}  train batch {row['batch_size']}: CMAL / {row['reference']} = "
                  f"{row['paired_ratio']:.3f} paired (medians {row['ratio']:.3f}, min {row['min_ratio']:.3f}; "
                  f"target <= {target:.2f})")
        elif row["section"] == "memory":
            verdict = "PASS" if row["saving"] >= TARGET_CHECKPOINTING_SAVING else "FAIL"
            print(f"  {verdict}  gradient checkpointing cuts the training-step peak at batch {row['batch_size']} by "
                  f"{row['saving']:.1%} (target >= {TARGET_CHECKPOINTING_SAVING:.0%})")
        elif row["section"] == "attn" and "value" in row:
            print(f"  {'PASS' if row['value'] == 'sdpa' else 'FAIL'}  CmalConfig() default attn_implementation = "
                  f"{row['value']!r}")
        elif row["section"] == "attn":
            alone = row["attention_alone_ms"]
            verdict = "PASS" if row["paired_ratio"] <= 1.0 else "FAIL"
            print(f"  {verdict}  sdpa / eager, {row['subject'].removesuffix(' sdpa')} batch {row['batch_size']}: "
                  f"{row['paired_ratio']:.3f} paired (medians {row['ratio']:.3f}, min {row['min_ratio']:.3f}; "
                  "target <= 1.00); attention alone: "
                  f"median {alone['sdpa'] / alone['eager']:.3f}, min {alone['sdpa_min'] / alone['eager_min']:.3f}")

    print("\nMarkdown (benchmarks/PERFORMANCE.md):\n")
    print(f"Measured {datetime.date.today().isoformat()}: {os.cpu_count()}-core {platform.machine()} CPU, "
          f"torch.set_num_threads({args.threads}), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"`bench_model.py{' --quick' if args.quick else ''}`, 1-minute load average {load[0]:.2f} at the start "
          f"and {load[1]:.2f} at the end (the benchmark alone brings it to about its thread count).\n")
    print("| measurement | batch | CMAL (median) | reference (median) | ratio of medians | paired ratio (range) "
          "| ratio of minima |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if row["section"] in ("train", "infer") or (row["section"] == "attn" and "ratio" in row):
            print(f"| {row['section']}: {row['subject']} / {row['reference']} | {row['batch_size']} | "
                  f"{row['subject_ms']:.0f} ms | {row['reference_ms']:.0f} ms | {row['ratio']:.3f} | "
                  f"**{row['paired_ratio']:.3f}** ({row['paired_range'][0]:.2f}-{row['paired_range'][1]:.2f}) | "
                  f"{row['min_ratio']:.3f} |")
        elif row["section"] == "memory":
            with_, without = row["with"], row["without"]
            print(f"| memory: training-step torch peak, checkpointing on / off | {row['batch_size']} | "
                  f"{with_['torch_peak_bytes'] / 2**20:.0f} MiB | {without['torch_peak_bytes'] / 2**20:.0f} MiB | "
                  f"{1 - row['saving']:.3f} | | |")
            if row["rss_saving"] is not None:
                print(f"| memory: training-step RSS peak, checkpointing on / off | {row['batch_size']} | "
                      f"{with_['rss_peak_delta_bytes'] / 2**20:.0f} MiB | "
                      f"{without['rss_peak_delta_bytes'] / 2**20:.0f} MiB | {1 - row['rss_saving']:.3f} | | |")
            print(f"| memory: training-step time, checkpointing on / off | {row['batch_size']} | "
                  f"{with_['step_ms']:.0f} ms | {without['step_ms']:.0f} ms | {row['slowdown']:.3f} | | |")


@dataclass
class BenchModelArguments:
    """The flags of the benchmark (`HfArgumentParser`: `--cmal-root` and `--cmal_root` alike)."""

    quick: bool = field(default=False, metadata={"help": "small shapes and few iterations (< 1 minute)"})
    threads: int = field(default_factory=os.cpu_count, metadata={
        "help": "torch.set_num_threads for every measurement (default: all cores)"})
    sections: str = field(default=",".join(SECTIONS), metadata={"help": f"comma-separated subset of {SECTIONS}"})
    json: Path | None = field(default=None, metadata={"help": "also write every measurement to this JSON file"})
    cmal_root: str | None = field(default=None, metadata={
        "help": "import modeling_cmal from this folder (a patched copy), not the repo's"})
    memory_child: str | None = field(default=None, metadata={"help": argparse.SUPPRESS})

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        unknown = sorted(set(self.section_list) - set(SECTIONS))
        if unknown:
            raise ValueError(f"--sections must be a subset of {SECTIONS}, got {unknown}")

    @property
    def section_list(self) -> list[str]:
        return [section.strip() for section in self.sections.split(",") if section.strip()]


def parse_args(argv=None) -> BenchModelArguments:
    """The flags of `argv` (default `sys.argv[1:]`); a bad one stops with exit status 2 and its name. The few lines
    of `cmal_processing.arguments.parse_dataclasses`, not that module: importing `cmal_processing` imports the repo's
    `modeling_cmal`, before `--cmal-root` could put a patched copy first."""
    parser = HfArgumentParser(BenchModelArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                           look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)

    hf_logging.set_verbosity_error()
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    sections = args.section_list

    torch.set_num_threads(args.threads)
    cmal = import_cmal(args.cmal_root)
    shapes = QUICK if args.quick else FULL
    print(f"CMAL benchmark ({'quick' if args.quick else 'full'}): torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()} CPU x{os.cpu_count()}, modeling_cmal from "
          f"{Path(cmal.__file__).parent}")
    print(f"shapes: {json.dumps({k: v for k, v in asdict(shapes).items() if k != 'iterations'})}")
    print(f"(warm-up, timed) calls per batch size: {json.dumps(shapes.iterations)}")
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5:
        print(f"WARNING: 1-minute load average {load_at_start:.2f} before the start: other processes use the cores; "
              "interleaving keeps the ratios comparable, absolute times are inflated and noisier")

    started = time.perf_counter()
    rows: list[dict] = []
    runners = {"train": lambda: run_train(cmal, shapes), "infer": lambda: run_infer(cmal, shapes),
               "memory": lambda: run_memory(args, shapes), "attn": lambda: run_attn(cmal, shapes)}
    for section in SECTIONS:
        if section in sections:
            section_started = time.perf_counter()
            rows += runners[section]()
            gc.collect()
            print(f"  ({section}: {time.perf_counter() - section_started:.0f} s)")
    summarize(rows, args, load=(load_at_start, os.getloadavg()[0]))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"shapes": asdict(shapes), "threads": args.threads,
                                         "torch": torch.__version__, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
