"""Bad input answered by a clear error, and a clone that tests itself (issue 17).

- The tests carry their own data (`tests/data/`): nothing under `tests/` reads `../shared`.
- `CmalConfig` refuses an unknown `hidden_act`, `pad_token_id` outside the vocabulary, NaN / inf
  `initializer_range` or `layer_norm_eps`, a `config.json` that is not a JSON object, and a non-mapping `id2label`,
  each with a `ValueError` naming the field (and, for files, the path).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from huggingface_hub.errors import (StrictDataclassClassValidationError, StrictDataclassError,
                                    StrictDataclassFieldValidationError)

from modeling_cmal import CmalConfig

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


# ----------------------------------------------------------------------------------------------------------------
# A clone that tests itself
# ----------------------------------------------------------------------------------------------------------------


def test_tests_carry_their_own_data(test_data_dir):
    assert test_data_dir == TESTS_DIR / "data"
    seeds = json.loads((test_data_dir / "real_image_seeds.json").read_text())
    assert {"astronaut", "chelsea", "coffee"} <= set(seeds["images"])
    vocab = test_data_dir / "vg_objects_vocab.txt"
    # one copy of the Visual Genome list: the test data links to the one the package ships
    assert vocab.resolve() == (REPO_ROOT / "modeling_cmal" / "data" / "vg_objects_vocab.txt").resolve()
    assert len(vocab.read_text().splitlines()) == 1600


def test_no_test_or_program_reads_the_shared_folder_beside_the_repository():
    """A user's clone has no ../shared: neither the tests nor the example programs may read it."""
    pattern = re.compile(r"""(\.\./shared|["']shared["']|SHARED_DIR)""")
    files = [*TESTS_DIR.glob("*.py"), *(TESTS_DIR.parent / "examples").glob("*.py")]
    offenders = [f"{path.parent.name}/{path.name}:{number}" for path in sorted(files) if path.name != Path(__file__).name
                 for number, line in enumerate(path.read_text().splitlines(), start=1) if pattern.search(line)]
    assert offenders == []


# ----------------------------------------------------------------------------------------------------------------
# CmalConfig
# ----------------------------------------------------------------------------------------------------------------

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_text_layers=1, num_visual_layers=1,
            num_unified_layers=1, visual_feat_dim=8, vocab_size=100, num_anchor_concepts=10)


# A config refuses a value of the wrong type through `@strict` (as transformers' own configs do: "Field 'x' expected
# int, got str (value: '3')") and a value of the right type out of range through its validators ("CmalConfig.x must
# be ..., got ..."); both errors name the field and the value.
CONFIG_ERRORS = (ValueError, StrictDataclassError)


def wrong_type(name: str, value) -> str:
    """The message `@strict` gives for `value` of the wrong type in field `name`."""
    return rf"Field '{name}' .*{re.escape(repr(value))}"


@pytest.mark.parametrize("hidden_act", ["nope", "GELU", ""])
def test_config_refuses_an_activation_outside_act2fn(hidden_act):
    # used to be accepted, then a KeyError when the model was built
    with pytest.raises(StrictDataclassClassValidationError,
                       match=r"CmalConfig.hidden_act must be the name of an activation of transformers' ACT2FN, one of "
                             r"\[.*'gelu'.*\], got " + re.escape(repr(hidden_act))):
        CmalConfig(**TINY, hidden_act=hidden_act)


@pytest.mark.parametrize("name, value", [("hidden_act", None), ("hidden_act", 3), ("hidden_act", math.tanh),
                                         ("classifier_activation", 1.0), ("hidden_size", "32"), ("hidden_size", True),
                                         ("num_text_layers", 1.0), ("default_anchor_action", None),
                                         ("tie_word_embeddings", "yes")])
def test_config_refuses_a_field_of_the_wrong_type_naming_it(name, value):
    with pytest.raises(StrictDataclassFieldValidationError, match=wrong_type(name, value)):
        CmalConfig(**{**TINY, name: value})


@pytest.mark.parametrize("hidden_act", ["gelu", "relu", "gelu_new", "silu", "tanh"])
def test_config_accepts_every_act2fn_activation_and_the_model_builds(hidden_act):
    from modeling_cmal import CmalModel

    CmalModel(CmalConfig(**TINY, hidden_act=hidden_act))


@pytest.mark.parametrize("pad_token_id", [100, 101, 10**9, -1, True, 1.0, "0"])
def test_config_refuses_a_pad_token_id_outside_the_vocabulary(pad_token_id):
    # 100 >= vocab_size 100 used to be an AssertionError from torch.nn.Embedding when the model was built
    in_range = r"CmalConfig.pad_token_id must be None or an int in \[0, vocab_size = 100\), got "
    typed = isinstance(pad_token_id, int) and not isinstance(pad_token_id, bool)
    with pytest.raises(CONFIG_ERRORS, match=in_range + re.escape(repr(pad_token_id)) if typed
                       else wrong_type("pad_token_id", pad_token_id)):
        CmalConfig(**TINY, pad_token_id=pad_token_id)


def test_config_pad_token_id_inside_the_vocabulary_or_none_is_accepted():
    assert CmalConfig(**TINY, pad_token_id=99).pad_token_id == 99
    assert CmalConfig(**TINY, pad_token_id=None).pad_token_id is None


@pytest.mark.parametrize("name", ["initializer_range", "layer_norm_eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0.0, -1e-3, True, "0.02"])
def test_config_refuses_non_finite_or_non_positive_initializer_range_and_layer_norm_eps(name, value):
    # NaN and inf used to be accepted and give NaN outputs
    typed = isinstance(value, float)
    with pytest.raises(CONFIG_ERRORS, match=rf"CmalConfig.{name} must be a finite float > 0, got "
                       + re.escape(repr(value)) if typed else wrong_type(name, value)):
        CmalConfig(**TINY, **{name: value})


def test_config_float_fields_take_ints_as_transformers_configs_do():
    config = CmalConfig(**TINY, hidden_dropout_prob=0, itc_loss_weight=1, anchor_mask_both_rate=0, layer_norm_eps=1)
    assert (config.hidden_dropout_prob, config.itc_loss_weight, config.layer_norm_eps) == (0, 1, 1)


@pytest.mark.parametrize("content, kind", [("[1, 2]", "array"), ("null", "null"), ('"cmal"', "string"),
                                           ("5", "number"), ("true", "boolean")])
def test_config_from_pretrained_on_a_config_json_that_is_not_an_object(tmp_path, content, kind):
    # a list, null or a string used to be a TypeError from inside transformers
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + r" must hold a JSON object of "
                                         rf"CmalConfig fields .*got a JSON {kind}: "):
        CmalConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, value, message", [
    ("id2label", "entailment", r"CmalConfig.id2label must be a dict \(label id -> name\) or None, got str 'entailment'"),
    ("id2label", ["yes", "no"], r"CmalConfig.id2label must be a dict \(label id -> name\) or None, got list"),
    ("id2label", {"yes": 0}, r"CmalConfig.id2label label ids must be integers .*got 'yes'"),
    ("label2id", "yes", r"CmalConfig.label2id must be a dict \(name -> label id\) or None, got str 'yes'"),
])
def test_config_refuses_a_label_map_that_is_not_a_dict_of_ids(name, value, message):
    # a string used to be an AttributeError ('str' object has no attribute 'items')
    with pytest.raises(ValueError, match=message):
        CmalConfig(**TINY, **{name: value})


def test_config_label_maps_round_trip_through_a_folder(tmp_path):
    config = CmalConfig(**TINY, id2label={0: "no", 1: "yes"})
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["id2label"] == {"0": "no", "1": "yes"}
    loaded = CmalConfig.from_pretrained(tmp_path)
    assert loaded.id2label == {0: "no", 1: "yes"}
    assert CmalConfig(**TINY, num_labels=3).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    # a config.json with a bad field names the field
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "layer_norm_eps": float("nan")}))
    with pytest.raises(StrictDataclassClassValidationError,
                       match="CmalConfig.layer_norm_eps must be a finite float > 0, got nan"):
        CmalConfig.from_pretrained(tmp_path)
