"""Tests of CmalPretrainingCollator (modeling_cmal/collator_cmal.py): MLM targets, anchor actions, ITM negatives,
reproducibility and exact resume."""

import io
import re

import numpy as np
import pytest
import torch

from modeling_cmal import CmalConfig
from modeling_cmal.collator_cmal import IGNORE_INDEX, CmalPretrainingCollator
from modeling_cmal.configuration_cmal import ANCHOR_ACTIONS, ANCHOR_RATE_FIELDS
from modeling_cmal.processing_cmal import CmalProcessor

FEATURE_DIM = 16
OBJECTS = ["cup", "saucer", "spoon", "dog", "cat", "car", "bus", "man", "woman", "tree", "horse", "bicycle",
           "tennis racket", "traffic light", "umbrella", "bench", "giraffe", "pizza"]
FILLERS = ["next to", "near", "behind", "in front of", "beside", "under", "with"]


def make_rows(count: int, seed: int = 0) -> list[dict]:
    """Dataset rows like `cmal_processing` writes them (float16 features, normalised boxes); two captions per image,
    so rows 2k and 2k + 1 share an `image_id`, and every caption is different."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        named = [str(name) for name in rng.choice(OBJECTS, size=3, replace=False)]
        extra = [str(name) for name in rng.choice(OBJECTS, size=int(rng.integers(0, 4)))]
        tags = named + extra
        order = rng.permutation(len(tags))
        x1, y1 = rng.uniform(0, 0.5, (2, len(tags)))
        caption = (f"caption {index}: a {named[0]} {rng.choice(FILLERS)} the {named[1]} and "
                   f"{rng.choice(['a', 'two', 'some'])} {named[2]} on a sunny day")
        rows.append({
            "image_id": f"image {index // 2}",
            "text": caption,
            "visual_feats": rng.standard_normal((len(tags), FEATURE_DIM)).astype(np.float16),
            "visual_pos": np.stack([x1, y1, x1 + 0.3, y1 + 0.4], 1).astype(np.float32)[order],
            "tags": np.asarray(tags)[order],
            "scores": rng.uniform(0.2, 1.0, len(tags)).astype(np.float32)[order],
        })
    return rows


@pytest.fixture(scope="module")
def processor(bert_dir):
    from transformers import BertTokenizer

    return CmalProcessor(tokenizer=BertTokenizer.from_pretrained(str(bert_dir), model_max_length=32))


@pytest.fixture(scope="module")
def config(processor):
    return CmalConfig.from_size("tiny", visual_feat_dim=FEATURE_DIM, num_anchor_concepts=len(processor.lexicon),
                                vocab_size=len(processor.tokenizer))


@pytest.fixture(scope="module")
def rows():
    return make_rows(320)


def batches(collator, rows, batch_size=32):
    return [collator(rows[start: start + batch_size]) for start in range(0, len(rows), batch_size)]


def regions_of(row: dict) -> dict:
    return {"visual_feats": row["visual_feats"], "visual_pos": row["visual_pos"], "tags": row["tags"],
            "scores": row["scores"]}


def caption_sources(processor, rows, batch) -> list[int]:
    """The row whose caption each sample carries: captions are all different, and masking (labelled on positives,
    unlabelled on negatives) changes about 15 % of the non-anchor pieces, so the caption agreeing best wins. (The
    collators of the tests that call this hide no anchor word: two captions may differ in their anchor words only.)"""
    tokenized = [processor.tokenizer(row["text"], truncation=True)["input_ids"] for row in rows]
    sources = []
    for input_ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        ids = [label if label != IGNORE_INDEX else piece for piece, label in zip(input_ids, labels)]
        length = sum(1 for piece in ids if piece != processor.tokenizer.pad_token_id)
        agreement = [sum(a == b for a, b in zip(ids, pieces)) / len(pieces) if len(pieces) == length else 0.0
                     for pieces in tokenized]
        best = int(np.argmax(agreement))
        assert agreement[best] >= 0.6 and sorted(agreement)[-2] < agreement[best]
        sources.append(best)
    return sources


def anchor_groups(batch, sample: int) -> dict[int, set[int]]:
    """Region → the set of actions of its anchor rows."""
    groups: dict[int, set[int]] = {}
    pairs, actions = batch["anchor_pairs"][sample].tolist(), batch["anchor_actions"][sample].tolist()
    for (piece, region), action in zip(pairs, actions):
        if piece >= 0:
            groups.setdefault(region, set()).add(action)
    return groups


def test_batch_holds_every_input_and_trains_the_model(processor, config, rows):
    from modeling_cmal import CmalForPreTraining

    collator = CmalPretrainingCollator(processor, config, seed=0)
    batch = collator(rows[:16])
    expected = ["input_ids", "token_type_ids", "attention_mask", "visual_feats", "visual_pos",
                "visual_attention_mask", "anchor_pairs", "anchor_concept_ids", "anchor_actions", "labels",
                "itm_labels", "mlm_positions"]
    assert sorted(batch) == sorted(expected)
    assert all(isinstance(value, torch.Tensor) for value in batch.values())
    assert batch["visual_feats"].dtype == torch.float32 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["itm_labels"].shape == (16,) and batch["anchor_pairs"].shape[0] == 16
    torch.manual_seed(0)
    outputs = CmalForPreTraining(config)(**batch)
    for loss in (outputs.loss, outputs.amc_loss, outputs.mlm_loss, outputs.itm_loss):
        assert loss is not None and torch.isfinite(loss)


def test_mlm_masks_non_anchor_pieces_at_80_10_10_and_labels_positives_only(processor, config, rows):
    collator = CmalPretrainingCollator(processor, config, mlm_probability=0.15, itm_clean_rate=0.0, seed=1, anchor_mask_text_rate=0.0)
    special = set(processor.tokenizer.all_special_ids)
    counts = {"candidates": 0, "labelled": 0, "mask": 0, "same": 0, "random": 0}
    rows = rows + make_rows(320, seed=2)
    for start, batch in zip(range(0, len(rows), 32), batches(collator, rows)):
        batch_rows = rows[start: start + 32]
        sources = caption_sources(processor, batch_rows, batch)
        reference = processor(text=[batch_rows[source]["text"] for source in sources],
                              regions=[regions_of(row) for row in batch_rows], return_tensors="pt")
        labelled = batch["labels"] != IGNORE_INDEX
        positive = (batch["itm_labels"] == 1).unsqueeze(1)
        hidden = hidden_pieces(batch)
        # Untouched pieces of positives are the reference tokens, labels are the original ones.
        kept = ~labelled & positive & ~hidden
        assert torch.equal(batch["input_ids"][kept], reference["input_ids"][kept])
        assert torch.equal(batch["labels"][labelled], reference["input_ids"][labelled])
        # Negatives are masked alike (masking must not tell the ITM label) but predict nothing.
        negative = ~positive.expand_as(labelled)
        changed = (batch["input_ids"] != reference["input_ids"]) & negative
        counts["negative_changed"] = counts.get("negative_changed", 0) + int(changed.sum())
        anchor_piece = torch.zeros_like(labelled)
        for sample, pairs in enumerate(batch["anchor_pairs"]):
            anchor_piece[sample, pairs[pairs[:, 0] >= 0, 0]] = True
        is_special = torch.isin(reference["input_ids"], torch.tensor(sorted(special)))
        assert not (changed & (is_special | (anchor_piece & ~hidden))).any(), \
            "a special or anchor piece of a negative changed"
        candidates = (batch["attention_mask"] == 1) & ~is_special & ~anchor_piece & positive
        assert not (labelled & ~candidates).any(), "MLM on a special, anchor, padding or negative piece"
        assert anchor_piece.sum() > 0
        counts["candidates"] += int(candidates.sum())
        counts["labelled"] += int(labelled.sum())
        masked_to = batch["input_ids"][labelled]
        counts["mask"] += int((masked_to == processor.tokenizer.mask_token_id).sum())
        counts["same"] += int((masked_to == batch["labels"][labelled]).sum())
    counts["random"] = counts["labelled"] - counts["mask"] - counts["same"]
    # About half the pairs are negatives, masked at the same rate, and 90 % of a masked piece changes ([MASK] or a
    # random piece): their changed pieces come to about 0.9 x the positives' labelled ones; 0.5 x leaves room.
    assert counts["negative_changed"] > 0.5 * counts["labelled"]
    # Binomial tolerances (about 4 standard deviations) for ~3,800 candidates and ~570 masked pieces.
    assert counts["candidates"] > 3000
    assert abs(counts["labelled"] / counts["candidates"] - 0.15) < 0.025
    assert abs(counts["mask"] / counts["labelled"] - 0.8) < 0.07
    assert abs(counts["same"] / counts["labelled"] - 0.1) < 0.055
    assert abs(counts["random"] / counts["labelled"] - 0.1) < 0.055


@pytest.mark.parametrize("rates", [None, (0.2, 0.3, 0.1, 0.15, 0.25), (0.0, 0.0, 0.0, 0.0, 0.0)])
def test_anchor_actions_are_drawn_per_anchor_at_the_rates(processor, config, rows, rates):
    if rates is None:
        collator = CmalPretrainingCollator(processor, config, itm_negative_rate=0.0, itm_clean_rate=0.0, seed=2)
        expected = [config.anchor_keep_rate, *(getattr(config, name) for name in ANCHOR_RATE_FIELDS)]
    else:
        collator = CmalPretrainingCollator(processor, config, **dict(zip(ANCHOR_RATE_FIELDS, rates)),
                                           itm_negative_rate=0.0, itm_clean_rate=0.0, seed=2)
        expected = [1 - sum(rates), *rates]
    counts = np.zeros(len(ANCHOR_ACTIONS))
    for batch in batches(collator, rows + make_rows(640, seed=1)):
        padding = batch["anchor_pairs"][..., 0] < 0
        assert (batch["anchor_actions"][padding] == 0).all()
        for sample in range(batch["anchor_pairs"].shape[0]):
            for actions in anchor_groups(batch, sample).values():
                assert len(actions) == 1, "the pieces of one anchor got different actions"
                counts[actions.pop()] += 1
    # ~2,500 anchors: 0.04 is about 4 standard deviations of a rate near 0.5.
    assert counts.sum() > 2000
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.04)


def hidden_pieces(batch) -> torch.Tensor:
    """`[B, N]` bool: the pieces of mask-text anchors (hidden as [MASK] at the input)."""
    hidden = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    pieces = batch["anchor_pairs"][..., 0]
    rows = (batch["anchor_actions"] == ANCHOR_ACTIONS.index("mask_text")) & (pieces >= 0)
    sample = torch.arange(pieces.shape[0]).unsqueeze(1).expand_as(pieces)
    hidden[sample[rows], pieces[rows]] = True
    return hidden


def test_mask_text_and_mask_region_anchors_are_hidden_at_the_input(processor, config, rows):
    """What AMC must find through the other modality is not in the input of its own encoder: the pieces of a
    mask-text word are [MASK], the features of a mask-region region are zeros (its box stays); nothing else is."""
    collator = CmalPretrainingCollator(processor, config, anchor_fill_text_rate=0.0, anchor_fill_region_rate=0.0,
                                       anchor_mask_both_rate=0.0, anchor_mask_text_rate=0.5,
                                       anchor_mask_region_rate=0.5, mlm_probability=0.0, itm_negative_rate=0.0,
                                       itm_clean_rate=0.0, seed=6)
    seen = {"text": 0, "region": 0}
    for start, batch in zip(range(0, len(rows), 32), batches(collator, rows)):
        reference = processor(text=[row["text"] for row in rows[start: start + 32]],
                              regions=[regions_of(row) for row in rows[start: start + 32]], return_tensors="pt")
        hidden = hidden_pieces(batch)
        assert (batch["input_ids"][hidden] == processor.tokenizer.mask_token_id).all()
        assert torch.equal(batch["input_ids"][~hidden], reference["input_ids"][~hidden])
        blank = torch.zeros(batch["visual_feats"].shape[:2], dtype=torch.bool)
        regions, actions = batch["anchor_pairs"][..., 1], batch["anchor_actions"]
        for sample in range(len(regions)):
            for region, action in zip(regions[sample].tolist(), actions[sample].tolist()):
                if region >= 0 and action == ANCHOR_ACTIONS.index("mask_region"):
                    blank[sample, region] = True
        assert (batch["visual_feats"][blank] == 0).all()
        torch.testing.assert_close(batch["visual_feats"][~blank], reference["visual_feats"][~blank])
        torch.testing.assert_close(batch["visual_pos"], reference["visual_pos"])
        seen["text"] += int(hidden.sum())
        seen["region"] += int(blank.sum())
    assert seen["text"] > 0 and seen["region"] > 0


def test_itm_negatives_pair_other_images_with_recomputed_anchors_and_no_mlm_labels(processor, config, rows):
    collator = CmalPretrainingCollator(processor, config, itm_negative_rate=0.5, itm_clean_rate=0.0, seed=3, anchor_mask_text_rate=0.0)
    negatives = total = 0
    for start, batch in zip(range(0, len(rows), 32), batches(collator, rows)):
        batch_rows = rows[start: start + 32]
        sources = caption_sources(processor, batch_rows, batch)
        for sample, source in enumerate(sources):
            total += 1
            if batch["itm_labels"][sample] == 1:
                assert source == sample
                continue
            negatives += 1
            assert batch_rows[source]["image_id"] != batch_rows[sample]["image_id"]
            assert (batch["labels"][sample] == IGNORE_INDEX).all()
            alone = processor(text=batch_rows[source]["text"], regions=regions_of(batch_rows[sample]),
                              return_tensors="pt")
            rows_found = alone["anchor_pairs"].shape[1]
            assert torch.equal(batch["anchor_pairs"][sample, :rows_found], alone["anchor_pairs"][0])
            assert torch.equal(batch["anchor_concept_ids"][sample, :rows_found], alone["anchor_concept_ids"][0])
            assert (batch["anchor_pairs"][sample, rows_found:] == -1).all()
            tags = [str(tag) for tag in batch_rows[sample]["tags"]]
            for (piece, region), concept in zip(alone["anchor_pairs"][0].tolist(),
                                                alone["anchor_concept_ids"][0].tolist()):
                assert processor.lexicon.tag_concept_id(tags[region]) == concept
    # 320 samples: 0.1 is about 3.5 standard deviations.
    assert abs(negatives / total - 0.5) < 0.1


_OBJECT_PATTERN = re.compile(r"\b(" + "|".join(sorted(map(re.escape, OBJECTS), key=len, reverse=True)) + r")\b")


def _objects_and_frame(text: str) -> tuple[list[str], str]:
    """The object names a test caption mentions, in order, and the caption with each of them replaced by `#`."""
    return _OBJECT_PATTERN.findall(text), _OBJECT_PATTERN.sub("#", text)


def test_hard_negatives_edit_one_object_or_swap_two_and_are_anchored_anew(processor, config, rows):
    keep_only = {name: 0.0 for name in ANCHOR_RATE_FIELDS}  # every piece as tokenised: the edit is readable
    collator = CmalPretrainingCollator(processor, config, itm_negative_rate=0.5, itm_hard_negative_rate=1.0,
                                       mlm_probability=0.0, itm_clean_rate=0.0, seed=11, **keep_only)
    decode = processor.tokenizer.decode
    kinds = {"replaced": 0, "swapped": 0, "another caption": 0, "positive": 0}
    for start in range(0, len(rows), 32):
        batch_rows = rows[start: start + 32]
        batch = collator(batch_rows)
        for sample, row in enumerate(batch_rows):
            shown = decode(batch["input_ids"][sample], skip_special_tokens=True)
            own = decode(processor.tokenizer(row["text"])["input_ids"], skip_special_tokens=True)
            if batch["itm_labels"][sample] == 1:
                assert shown == own
                kinds["positive"] += 1
                continue
            assert (batch["labels"][sample] == IGNORE_INDEX).all()
            others = [decode(processor.tokenizer(other["text"])["input_ids"], skip_special_tokens=True)
                      for other in batch_rows if other["image_id"] != row["image_id"]]
            if shown in others:  # only when the caption has nothing to edit
                kinds["another caption"] += 1
                continue
            (named, frame), (edited, edited_frame) = _objects_and_frame(own), _objects_and_frame(shown)
            assert edited_frame == frame and len(edited) == len(named), (own, shown)  # only object words change
            changed = [position for position, (old, new) in enumerate(zip(named, edited)) if old != new]
            tags = {str(tag) for tag in row["tags"]}
            if len(changed) == 1:  # replaced by an object of another image of the batch that this one has not
                position = changed[0]
                assert named[position] in tags and edited[position] not in tags, (own, shown, tags)
                assert any(edited[position] in _objects_and_frame(other)[0] for other in others)
                kinds["replaced"] += 1
            else:  # two anchored words of different objects swapped
                first, second = changed
                assert len(changed) == 2 and (edited[first], edited[second]) == (named[second], named[first])
                assert named[first] != named[second] and {named[first], named[second]} <= tags
                kinds["swapped"] += 1
            alone = processor(text=shown, regions=regions_of(row), return_tensors="pt")
            found = alone["anchor_pairs"].shape[1]
            assert torch.equal(batch["anchor_pairs"][sample, :found], alone["anchor_pairs"][0])
            assert torch.equal(batch["anchor_concept_ids"][sample, :found], alone["anchor_concept_ids"][0])
            assert (batch["anchor_pairs"][sample, found:] == -1).all()
    negatives = len(rows) - kinds["positive"]
    # Every caption of these rows names objects its image has: all negatives are edits, of both kinds.
    assert kinds["another caption"] == 0 and min(kinds["replaced"], kinds["swapped"]) > 0.3 * negatives, kinds


def test_hard_negative_rate_shares_the_negatives_and_off_changes_nothing(processor, config, rows):
    # Off, pairing draws exactly what it drew before the option (which rows are negatives, which other caption), so
    # every later draw of the batch is as before; on, it draws more.
    for rate, extra_draws in ((0.0, False), (0.5, True)):
        collator = CmalPretrainingCollator(processor, config, seed=12, itm_hard_negative_rate=rate)
        generator = collator._start_batch(rows[:32])
        before = torch.Generator()
        before.set_state(generator.get_state())
        collator._pair_captions(rows[:32], generator)
        torch.rand(32, generator=before), torch.rand(32, generator=before)
        assert torch.equal(generator.get_state(), before.get_state()) != extra_draws
    half = CmalPretrainingCollator(processor, config, seed=12, itm_negative_rate=1.0, itm_hard_negative_rate=0.5,
                                   itm_clean_rate=0.0, mlm_probability=0.0,
                                   **{name: 0.0 for name in ANCHOR_RATE_FIELDS})
    decode = processor.tokenizer.decode
    own = edited = 0
    for start in range(0, len(rows), 32):
        batch_rows = rows[start: start + 32]
        texts = {decode(processor.tokenizer(row["text"])["input_ids"], skip_special_tokens=True): row["image_id"]
                 for row in batch_rows}
        for sample, ids in enumerate(half(batch_rows)["input_ids"]):
            shown = decode(ids, skip_special_tokens=True)
            if shown in texts:
                assert texts[shown] != batch_rows[sample]["image_id"]
                own += 1
            else:
                edited += 1
    # 320 negatives at 0.5: 0.1 is about 3.5 standard deviations.
    assert abs(edited / (own + edited) - 0.5) < 0.1
    # Rows with nothing to edit (no tags: no anchored word) get ordinary negatives.
    untagged = [{**row, "tags": None, "scores": None} for row in rows[:8]]
    every = CmalPretrainingCollator(processor, config, seed=12, itm_negative_rate=1.0, itm_hard_negative_rate=1.0,
                                    itm_clean_rate=0.0, mlm_probability=0.0,
                                    **{name: 0.0 for name in ANCHOR_RATE_FIELDS})
    batch = every(untagged)
    assert batch["itm_labels"].tolist() == [0] * 8
    captions = [decode(processor.tokenizer(row["text"])["input_ids"], skip_special_tokens=True) for row in untagged]
    for sample, ids in enumerate(batch["input_ids"]):
        shown = decode(ids, skip_special_tokens=True)
        assert shown in captions and untagged[captions.index(shown)]["image_id"] != untagged[sample]["image_id"]
    for value in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="itm_hard_negative_rate"):
            CmalPretrainingCollator(processor, config, itm_hard_negative_rate=value)


def test_no_negative_without_another_image(processor, config, rows):
    collator = CmalPretrainingCollator(processor, config, itm_negative_rate=1.0, seed=4)
    same_image = [{**row, "image_id": "one image"} for row in rows[:8]]
    assert collator(same_image)["itm_labels"].tolist() == [1] * 8
    assert collator(rows[:2])["itm_labels"].tolist() == [1, 1]  # rows 0 and 1 show the same image
    assert collator(rows[:4])["itm_labels"].tolist() == [0, 0, 0, 0]
    without_ids = [{key: value for key, value in row.items() if key != "image_id"} for row in rows[:2]]
    assert collator(without_ids)["itm_labels"].tolist() == [0, 0]  # rows without image_id count as different


def _assert_same(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def test_same_seed_gives_the_same_batches_and_state_dict_resumes_exactly(processor, config, rows):
    first = batches(CmalPretrainingCollator(processor, config, seed=7), rows[:128])
    again = batches(CmalPretrainingCollator(processor, config, seed=7), rows[:128])
    for batch, repeated in zip(first, again, strict=True):
        _assert_same(batch, repeated)
    other = CmalPretrainingCollator(processor, config, seed=8)(rows[:32])
    assert not torch.equal(other["labels"], first[0]["labels"])
    shifted = CmalPretrainingCollator(processor, config, seed=7)(rows[1:33])
    assert not torch.equal(shifted["itm_labels"], first[0]["itm_labels"])

    running = CmalPretrainingCollator(processor, config, seed=7)
    running(rows[:32])
    running(rows[32:64])
    running(rows[64:96])  # collated ahead by the data loader, then interrupted before it was used
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)  # as Accelerate's register_for_checkpointing saves it
    buffer.seek(0)
    resumed = CmalPretrainingCollator(processor, config, seed=123)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.seed == 7
    _assert_same(resumed(rows[64:96]), first[2])
    _assert_same(resumed(rows[96:128]), first[3])
    resumed.reset()
    _assert_same(resumed(rows[:32]), first[0])
    with pytest.raises(ValueError, match="state must be a dict with seed"):
        resumed.load_state_dict({})


def test_batches_match_between_processes_workers_and_accumulation(processor, config, rows):
    """Two ranks of 16 rows each see the same draws as one process accumulating two micro-batches of 16: a
    batch's draws depend on its rows only."""
    one_process = CmalPretrainingCollator(processor, config, seed=5)
    micro_batches = [one_process(rows[start: start + 16]) for start in range(0, 64, 16)]
    rank_0, rank_1 = (CmalPretrainingCollator(processor, config, seed=5) for _ in range(2))
    for step in range(2):
        _assert_same(rank_0(rows[32 * step: 32 * step + 16]), micro_batches[2 * step])
        _assert_same(rank_1(rows[32 * step + 16: 32 * step + 32]), micro_batches[2 * step + 1])


def test_rates_come_from_the_config_or_the_arguments_and_are_checked(processor, config):
    collator = CmalPretrainingCollator(processor, config)
    assert all(getattr(collator, name) == getattr(config, name) for name in ANCHOR_RATE_FIELDS)
    assert collator.mlm_probability == 0.15 and collator.itm_negative_rate == 0.5 and collator.itm_clean_rate == 0.2
    no_config = CmalPretrainingCollator(processor, anchor_fill_text_rate=0.2)
    assert no_config.anchor_fill_text_rate == 0.2
    assert no_config.anchor_fill_region_rate == CmalConfig.anchor_fill_region_rate
    silent = CmalConfig.from_size("tiny", visual_feat_dim=FEATURE_DIM, num_anchor_concepts=len(processor.lexicon),
                                  mlm_loss_weight=0.0, itm_loss_weight=0.0)
    off = CmalPretrainingCollator(processor, silent)
    assert off.mlm_probability == 0.0 and off.itm_negative_rate == 0.0 and off.itm_clean_rate == 0.0
    with pytest.raises(ValueError, match="at most 1"):
        CmalPretrainingCollator(processor, config, anchor_fill_text_rate=0.6, anchor_fill_region_rate=0.6)
    with pytest.raises(ValueError, match="mlm_probability"):
        CmalPretrainingCollator(processor, config, mlm_probability=1.5)
    with pytest.raises(ValueError, match="itm_clean_rate"):
        CmalPretrainingCollator(processor, config, itm_clean_rate=-0.1)
    mismatched = CmalConfig.from_size("tiny", visual_feat_dim=FEATURE_DIM, num_anchor_concepts=8)
    with pytest.raises(ValueError, match="num_anchor_concepts is 8"):
        CmalPretrainingCollator(processor, mismatched)
    with pytest.raises(ValueError, match=r"rows\[1\] has no \['visual_pos'\]"):
        collator([make_rows(1)[0], {"text": "a cup", "visual_feats": np.zeros((1, FEATURE_DIM))}])


def test_dataset_rows_in_numpy_format(processor, config, rows):
    from datasets import Dataset

    from cmal_processing.schema import pretrain_features

    features = pretrain_features(FEATURE_DIM)
    table = {name: [] for name in features}
    for row in rows[:32]:
        table["image_id"].append(row["image_id"])
        table["image_width"].append(640)
        table["image_height"].append(480)
        for name in ("text", "visual_feats", "visual_pos", "tags", "scores"):
            value = row[name]
            table[name].append(value.tolist() if isinstance(value, np.ndarray) else value)
    dataset = Dataset.from_dict(table, features=features).with_format("numpy")
    from_dataset = CmalPretrainingCollator(processor, config, seed=5)([dataset[index] for index in range(32)])
    from_dicts = CmalPretrainingCollator(processor, config, seed=5)(rows[:32])
    _assert_same(from_dataset, from_dicts)


def test_worker_processes_give_the_main_process_batches(processor, config, rows):
    from torch.utils.data import DataLoader

    collator = CmalPretrainingCollator(processor, config, seed=5)
    loader = DataLoader(rows[:64], batch_size=16, num_workers=2, collate_fn=collator)
    for start, batch in zip(range(0, 64, 16), loader, strict=True):
        _assert_same(batch, collator(rows[start: start + 16]))


def test_clean_pairs_are_left_as_fine_tuning_sees_them_for_both_itm_labels(processor, config, rows):
    """Without clean pairs every training input of the ITM head would carry fills or masks, and the head would
    learn to call every uncorrupted pair (fine-tuning, retrieval) a mismatch."""
    collator = CmalPretrainingCollator(processor, config, itm_clean_rate=0.3, seed=9, anchor_mask_text_rate=0.0)
    clean_labels = []
    for start, batch in zip(range(0, len(rows), 32), batches(collator, rows)):
        batch_rows = rows[start: start + 32]
        sources = caption_sources(processor, batch_rows, batch)
        reference = processor(text=[batch_rows[source]["text"] for source in sources],
                              regions=[regions_of(row) for row in batch_rows], return_tensors="pt")
        for sample in range(len(batch_rows)):
            untouched = torch.equal(batch["input_ids"][sample], reference["input_ids"][sample])
            keeps = bool((batch["anchor_actions"][sample] == 0).all())
            has_anchor = bool((batch["anchor_pairs"][sample, :, 0] >= 0).any())
            if untouched and keeps and has_anchor:
                assert (batch["labels"][sample] == IGNORE_INDEX).all()
                clean_labels.append(int(batch["itm_labels"][sample]))
    # about 0.3 of the pairs with an anchor are clean, of both ITM labels
    assert len(clean_labels) > 0.15 * len(rows) and 0 < np.mean(clean_labels) < 1


def test_mlm_positions_are_the_labelled_positions(processor, config, rows):
    from modeling_cmal.collator_cmal import mlm_prediction_positions

    batch = CmalPretrainingCollator(processor, config, seed=3)(rows[:16])
    assert torch.equal(batch["mlm_positions"], mlm_prediction_positions(batch["labels"]))
    for labels, positions in zip(batch["labels"], batch["mlm_positions"]):
        assert positions[positions >= 0].tolist() == torch.nonzero(labels != IGNORE_INDEX).flatten().tolist()


def test_a_batch_without_anchors_has_every_key(processor, config, rows):
    collator = CmalPretrainingCollator(processor, config, seed=0)
    anchored = collator(rows[:4])
    no_tags = [dict(row, tags=["zebra-unmatched"] * len(row["tags"])) for row in rows[:4]]
    empty = collator(no_tags)
    assert set(empty) == set(anchored)
    assert empty["anchor_pairs"].shape == (4, 0, 2)
    assert empty["anchor_concept_ids"].shape == empty["anchor_actions"].shape == (4, 0)
