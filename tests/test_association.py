"""Does pre-training teach cross-modal association? A linear probe that fails when it stops doing so.

A short pre-training of a small CMAL on the synthetic world, then a linear probe of the *shape of the object that
a colour word names* ("what shape is the red object?"), read from the trunk's state at the colour word. The text
holds no shape and no anchor (shape names are the tags, colours are not), so the probe can only succeed where the
trunk routed the word to the region of that colour and brought its shape back: association, not copying. The
same probe on the randomly initialised trunk is the control.
"""

import json

import numpy as np
import pytest
import torch

# Measured with this test's settings (seed 0): random trunk 0.14, pre-trained 0.33 after 300 steps (hidden 64,
# 1,500 scenes, chance ~0.15). The margin leaves room for seeds and machines without tuning to one run.
PROBE_MARGIN = 0.10
PRETRAINING_STEPS = 300


@pytest.fixture(scope="module")
def probe_corpus(tmp_path_factory):
    from cmal_processing.synthetic import build_synthetic_corpus

    root = tmp_path_factory.mktemp("association") / "corpus"
    build_synthetic_corpus(root, num_scenes=1500, seed=0)
    return root


def _colour_word_position(tokenizer, text: str) -> int:
    """The first piece of the colour word of "what shape is the <colour> <noun>?"."""
    words = text.rstrip("?").split()
    prefix = " ".join(words[:4])  # "what shape is the"
    return len(tokenizer(prefix)["input_ids"]) - 1  # [CLS] + the prefix's pieces (its [SEP] dropped)


@torch.no_grad()
def _probe_features(model, processor, rows) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    features, labels = [], []
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        batch = dict(processor(text=[str(row["text"]) for row in chunk],
                               regions=[{"features": row["visual_feats"], "boxes": row["visual_pos"],
                                         "tags": list(row["tags"]), "scores": row["scores"]} for row in chunk],
                               return_tensors="pt"))
        # The model's one anchor policy (config.default_anchor_action), as at fine-tuning and inference.
        batch.pop("anchor_actions", None)
        batch.pop("anchor_concept_ids")
        states = model.cmal(**batch).last_hidden_state
        for index, row in enumerate(chunk):
            position = _colour_word_position(processor.tokenizer, str(row["text"]))
            features.append(states[index, position].numpy())
            labels.append(int(row["answer_ids"][int(np.argmax(row["answer_scores"]))]))
    return np.stack(features), np.asarray(labels)


def _probe_accuracy(model, processor, train_rows, validation_rows) -> float:
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = _probe_features(model, processor, train_rows)
    validation_x, validation_y = _probe_features(model, processor, validation_rows)
    probe = LogisticRegression(max_iter=3000).fit(train_x, train_y)
    return float((probe.predict(validation_x) == validation_y).mean())


@pytest.mark.slow
def test_pretraining_teaches_the_shape_of_the_object_a_colour_word_names(probe_corpus, tokenizer):
    pytest.importorskip("sklearn")
    from cmal_processing.corpus import load_corpus

    from modeling_cmal import CmalConfig, CmalForPreTraining
    from modeling_cmal.collator_cmal import CmalPretrainingCollator
    from modeling_cmal.processing_cmal import CmalProcessor

    processor = CmalProcessor(tokenizer=tokenizer)
    info = json.loads((probe_corpus / "synthetic_config.json").read_text())
    config = CmalConfig(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        num_text_layers=1, num_visual_layers=1, num_unified_layers=2,
                        visual_feat_dim=info["feature_dim"], num_anchor_concepts=len(processor.lexicon))
    torch.manual_seed(0)
    model = CmalForPreTraining(config)
    vqa = load_corpus(probe_corpus / "vqa")
    rows = {split: [row for row in vqa[split] if row["question_type"] == "what shape is the"]
            for split in ("train", "validation")}
    assert len(rows["train"]) > 1000 and len(rows["validation"]) > 150
    random_trunk = _probe_accuracy(model, processor, rows["train"], rows["validation"])

    captions = list(load_corpus(probe_corpus / "pretrain")["train"])
    collator = CmalPretrainingCollator(processor, config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(PRETRAINING_STEPS):
        batch = collator([captions[index] for index in torch.randint(len(captions), (32,), generator=generator)])
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    pretrained_trunk = _probe_accuracy(model, processor, rows["train"], rows["validation"])
    assert pretrained_trunk >= random_trunk + PROBE_MARGIN, (
        f"probe of the named object's shape: pre-trained trunk {pretrained_trunk:.3f}, random trunk "
        f"{random_trunk:.3f}; pre-training must beat it by {PROBE_MARGIN}")
