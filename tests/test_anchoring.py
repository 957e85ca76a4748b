"""Tests of the anchor operator (modeling_cmal/anchoring.py): normalisation, the concept lexicon, matching."""

import copy
import itertools
import json
import math
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_cmal import anchoring
from modeling_cmal.anchoring import (
    COCO_CLASSES,
    AnchorMatch,
    AnchorStatistics,
    ConceptLexicon,
    anchor_statistics,
    find_anchors,
    normalize_phrase,
    singularize,
    split_words,
)

# The AMC label space of every model trained with the default lexicon: change it knowingly, never by accident.
DEFAULT_LEXICON_SIZE = 1363
DATA_DIR = Path(anchoring.__file__).parent / "data"
VG_CLASSES = [line.strip() for line in (DATA_DIR / "vg_objects_vocab.txt").read_text().splitlines() if line.strip()]
SYNONYM_TABLE = json.loads((DATA_DIR / "concept_synonyms.json").read_text(encoding="utf-8"))


def anchored(caption, tags, lexicon=None, scores=None):
    """`[(anchored words, tag)]` for a caption split with `split_words`."""
    lexicon = ConceptLexicon.default() if lexicon is None else lexicon
    words = split_words(caption)
    return [
        (" ".join(words[match.word_start : match.word_end]), tags[match.region_index])
        for match in find_anchors(words, tags, lexicon, scores)
    ]


# --------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plural, singular",
    [
        ("cups", "cup"), ("boxes", "box"), ("buses", "bus"), ("busses", "bus"), ("glasses", "glass"),
        ("dishes", "dish"), ("benches", "bench"), ("cherries", "cherry"), ("leaves", "leaf"), ("knives", "knife"),
        ("wolves", "wolf"), ("shelves", "shelf"), ("bookshelves", "bookshelf"), ("horses", "horse"),
        ("houses", "house"), ("vases", "vase"), ("tomatoes", "tomato"), ("shoes", "shoe"), ("taxis", "taxi"),
        ("skis", "ski"), ("ties", "tie"), ("flies", "fly"), ("movies", "movie"), ("mustaches", "mustache"),
        ("dresses", "dress"), ("lenses", "lens"), ("olives", "olive"), ("sleeves", "sleeve"), ("TVs", "tv"),
        ("Rackets", "racket"),
    ],
)  # fmt: skip
def test_singularize_regular_plurals(plural, singular):
    assert singularize(plural) == singular


@pytest.mark.parametrize(
    "plural, singular",
    [
        ("men", "man"), ("women", "woman"), ("policemen", "policeman"), ("people", "person"),
        ("children", "child"), ("feet", "foot"), ("teeth", "tooth"), ("mice", "mouse"), ("geese", "goose"),
        ("oxen", "ox"), ("cacti", "cactus"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"),
    ],
)  # fmt: skip
def test_singularize_irregulars(plural, singular):
    assert singularize(plural) == singular


@pytest.mark.parametrize(
    "word",
    ["glass", "bus", "grass", "dress", "cactus", "tennis", "this", "is", "was", "his", "its", "series", "species",
     "news", "lens", "gas", "analysis", "shorts", "clothes", "ramen", "specimen", "s", "a", ""],
)  # fmt: skip
def test_singularize_leaves_singulars_alone(word):
    assert singularize(word) == word


def test_singularize_meets_visual_genome_odd_names():
    # Visual Genome's class list was made singular by rule; the caption words must land on the same forms.
    for caption_word, vg_class in [("jeans", "jean"), ("pants", "pant"), ("sunglasses", "sunglass"),
                                   ("men", "man"), ("glasses", "glass"), ("trousers", "trouser")]:  # fmt: skip
        assert singularize(caption_word) == singularize(vg_class) == vg_class
    assert singularize("cookies") == "cookie"  # the lexicon makes "cooky" a synonym


def test_singularize_rejects_non_strings():
    with pytest.raises(ValueError, match=r"word must be a str, got 3 \(int\)"):
        singularize(3)


def test_normalize_phrase():
    assert normalize_phrase("Tennis  Rackets") == "tennis racket"
    assert normalize_phrase("  traffic\tlights ") == "traffic light"
    assert normalize_phrase("T-shirts") == "t - shirt"
    assert normalize_phrase("man's head") == "man ' s head"
    assert normalize_phrase("Café") == "cafe"
    assert normalize_phrase("") == ""
    with pytest.raises(ValueError, match=r"phrase must be a str, got \['cup'\] \(list\)"):
        normalize_phrase(["cup"])


def test_split_words():
    assert split_words("A man's T-shirt, 3.5 cm!") == ["a", "man", "'", "s", "t", "-", "shirt", ",", "3", ".", "5",
                                                       "cm", "!"]  # fmt: skip
    assert split_words("Crème brûlée\u00a0naïve 北京") == ["creme", "brulee", "naive", "北", "京"]
    assert split_words("a\x00b\tc") == ["ab", "c"]
    assert split_words("  ") == []
    with pytest.raises(ValueError, match="text must be a str"):
        split_words(None)


# Scripts whose Unicode properties are old: the Rust normaliser's tables lag behind Python's `unicodedata`.
_OLD_UNICODE = st.one_of(
    st.characters(max_codepoint=0x052F, exclude_categories=("Cs", "Cn")),
    st.characters(min_codepoint=0x2000, max_codepoint=0x206F, exclude_categories=("Cs", "Cn")),
    st.sampled_from("北京東\u3000\u3001\ufffd\ufeff\u0301\u00a0"),
)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=_OLD_UNICODE))
def test_split_words_agrees_with_the_bert_tokenizer(tokenizer, text):
    backend = tokenizer.backend_tokenizer
    expected = [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
    assert split_words(text) == expected


def test_tokenizer_words_give_the_same_anchors(tokenizer):
    caption = "Two Cups of espresso, a T-shirt and a man's tennis racket."
    tags = ["cup", "t-shirt", "tennis racket", "cup", "man"]
    encoding = tokenizer(caption)
    word_ids = sorted({word_id for word_id in encoding.word_ids() if word_id is not None})
    tokenizer_words = [caption[slice(*encoding.word_to_chars(word_id))] for word_id in word_ids]
    lexicon = ConceptLexicon.default()
    assert find_anchors(tokenizer_words, tags, lexicon) == find_anchors(split_words(caption), tags, lexicon)
    assert len(find_anchors(tokenizer_words, tags, lexicon)) == 4  # cups, t-shirt, man, tennis racket


# --------------------------------------------------------------------------------------------------------------
# Concept lexicon
# --------------------------------------------------------------------------------------------------------------


def test_lexicon_forms_and_ids():
    from_mapping = ConceptLexicon({"bicycle": ["bike"], "Cups": [], "traffic light": ["stoplight"]})
    from_sequence = ConceptLexicon([("bicycle", ["bike"]), "Cups", ("traffic light", ("stoplight",))])
    for lexicon in (from_mapping, from_sequence):
        assert len(lexicon) == 3
        assert lexicon.concept_names == ["bicycle", "Cups", "traffic light"]
        assert lexicon.concept_id("bikes") == lexicon.concept_id("Bicycle") == 0
        assert lexicon.concept_id("cup") == 1
        assert lexicon.tag_concept_id("Traffic Lights") == lexicon.concept_id("stoplights") == 2
        assert lexicon.concept_id("car") is None
        assert lexicon.head_noun_fallback is False
    assert from_mapping == from_sequence


def test_lexicon_concept_names_is_a_copy():
    lexicon = ConceptLexicon(["cup"])
    lexicon.concept_names.append("saucer")
    assert lexicon.concept_names == ["cup"]


@pytest.mark.parametrize(
    "concepts, message",
    [
        ({"bike": ["cycle"], "bicycle": ["bikes"]},
         r"alias 'bikes' of concept 'bicycle' normalises to 'bike', which concept 'bike' already has"),
        (["cup", "cups"], r"alias 'cups' of concept 'cups' normalises to 'cup', which concept 'cup' already has"),
        ({"": []}, r"concept name '' must be a non-empty str"),
        ({"  ": []}, r"concept name '  ' must be a non-empty str"),
        ([3], r"concepts\[0\] must be a name or a \(name, aliases\) pair, got 3"),
        ([("cup", ["mug"], "extra")], r"concepts\[0\] must be a name or a \(name, aliases\) pair"),
        ({"cup": "mug"}, r"aliases of concept 'cup' must be a sequence of str, got 'mug'"),
        ({"cup": [None]}, r"alias None of concept 'cup' must be a str"),
        ({"cup": ["!?"]}, None),
        ({"cup": ["\x00"]}, r"alias '\\x00' of concept 'cup' is empty"),
        ("cup", r"concepts must be a mapping \{name: aliases\} or a sequence"),
        (None, r"concepts must be a mapping"),
    ],
)  # fmt: skip
def test_lexicon_rejects_bad_concepts(concepts, message):
    if message is None:  # punctuation is a word like any other
        assert ConceptLexicon(concepts).concept_id("!?") == 0
        return
    with pytest.raises(ValueError, match=message):
        ConceptLexicon(concepts)


def test_lexicon_rejects_bad_options():
    with pytest.raises(ValueError, match="head_noun_fallback must be a bool, got 'yes'"):
        ConceptLexicon(["cup"], head_noun_fallback="yes")
    with pytest.raises(ValueError, match="tag_aliases names concept 'mug', which is not one of the concepts"):
        ConceptLexicon(["cup"], tag_aliases={"mug": ["cup"]})
    with pytest.raises(ValueError, match="alias 'cups' of concept 'mug' normalises to 'cup', which concept 'cup'"):
        ConceptLexicon(["cup", "mug"], tag_aliases={"mug": ["cups"]})
    with pytest.raises(ValueError, match="tag aliases of concept 'cup' must be a sequence of str, got 'mug'"):
        ConceptLexicon(["cup"], tag_aliases={"cup": "mug"})


def test_tag_aliases_name_a_concept_in_tags_only():
    lexicon = ConceptLexicon({"shorts": [], "man": []}, tag_aliases={"shorts": ["short"]})
    assert lexicon.tag_concept_id("short") == lexicon.concept_id("shorts") == 0
    assert lexicon.concept_id("short") is None
    assert anchored("a short man in shorts", ["short", "man"], lexicon) == [("man", "man"), ("shorts", "short")]


def test_head_noun_fallback_lookups():
    concepts = {"racket": ["racquet"], "tennis racket": []}
    plain = ConceptLexicon(concepts)
    fallback = ConceptLexicon(concepts, head_noun_fallback=True)
    assert plain.concept_id("squash rackets") is None and plain.tag_concept_id("squash racket") is None
    assert fallback.concept_id("squash rackets") == fallback.tag_concept_id("squash racquet") == 0
    assert plain.concept_id("tennis racket") == fallback.concept_id("tennis racket") == 1  # exact alias first
    assert fallback.head_noun_fallback is True


def test_extend_keeps_ids_and_adds_aliases():
    lexicon = ConceptLexicon({"bicycle": ["bike"], "cup": []})
    extended = lexicon.extend({"Bicycles": ["velocipede"], "saucer": ["plate"]}, tag_aliases={"saucer": ["dish"]})
    assert extended.concept_names == ["bicycle", "cup", "saucer"]
    assert extended.concept_id("velocipedes") == extended.concept_id("bike") == 0
    assert extended.concept_id("cup") == 1
    assert extended.concept_id("plates") == extended.tag_concept_id("dish") == 2
    assert extended.concept_id("dish") is None
    assert lexicon.concept_id("velocipede") is None and len(lexicon) == 2  # the original is unchanged
    with pytest.raises(ValueError, match="alias 'bike' of concept 'scooter' normalises to 'bike', which concept "
                                         "'bicycle' already has"):  # fmt: skip
        lexicon.extend({"scooter": ["bike"]})
    default = ConceptLexicon.default()
    assert default.extend(["rhombicosidodecahedron"]).concept_id("rhombicosidodecahedron") == len(default)


def test_round_trips(tmp_path):
    lexicon = ConceptLexicon(
        {"bicycle": ["bike", "bikes", "cycle"], "shorts": [], "t-shirt": ["tee shirt"]},
        head_noun_fallback=True,
        tag_aliases={"shorts": ["short"]},
    )
    data = lexicon.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["concepts"][0] == {"name": "bicycle", "aliases": ["bike", "cycle"], "tag_aliases": []}
    for copy_ in (ConceptLexicon.from_dict(data), pickle.loads(pickle.dumps(lexicon))):
        assert copy_ == lexicon and copy_.to_dict() == data and hash(copy_) == hash(lexicon)
        assert copy_.head_noun_fallback and copy_.tag_concept_id("short") == 1 and copy_.concept_id("short") is None
    path = tmp_path / "lexicon.json"
    lexicon.save(path)
    assert ConceptLexicon.load(path) == lexicon
    assert ConceptLexicon.load(path) != ConceptLexicon.from_dict({**data, "head_noun_fallback": False})
    assert copy.deepcopy(lexicon) is lexicon  # immutable: processors deep-copy their attributes


def test_from_dict_and_load_reject_bad_data(tmp_path):
    with pytest.raises(ValueError, match="data must be a dict written by ConceptLexicon.to_dict"):
        ConceptLexicon.from_dict({"concepts": []})
    data = ConceptLexicon(["cup"]).to_dict()
    with pytest.raises(ValueError, match="lexicon version 99 is not supported"):
        ConceptLexicon.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match=r"data\['concepts'\] must be a list"):
        ConceptLexicon.from_dict({**data, "concepts": [{"name": "cup"}]})
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON lexicon file"):
        ConceptLexicon.load(path)


def test_default_lexicon_is_stable_and_cached():
    lexicon = ConceptLexicon.default()
    assert len(lexicon) == DEFAULT_LEXICON_SIZE, "the default lexicon (AMC label space) changed size"
    assert ConceptLexicon.default() is lexicon
    assert lexicon.concept_names[: len(COCO_CLASSES)][:3] == ["person", "bicycle", "car"]
    with_fallback = ConceptLexicon.default(head_noun_fallback=True)
    assert with_fallback.head_noun_fallback and with_fallback.concept_names == lexicon.concept_names


def test_default_lexicon_covers_coco_and_visual_genome():
    lexicon = ConceptLexicon.default()
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80
    assert len(VG_CLASSES) == len(set(VG_CLASSES)) == 1600
    missing = [name for name in (*COCO_CLASSES, *VG_CLASSES) if lexicon.tag_concept_id(name) is None]
    assert missing == []
    # Every COCO class is also a caption word; Visual Genome classes too, except the tag-only ones.
    assert [name for name in COCO_CLASSES if lexicon.concept_id(name) is None] == []
    tag_only = {normalize_phrase(alias) for aliases in SYNONYM_TABLE["tag_aliases"].values() for alias in aliases}
    assert [name for name in VG_CLASSES if lexicon.concept_id(name) is None and normalize_phrase(name) not in tag_only] == []


def test_synonym_table_only_merges_known_classes():
    known = {normalize_phrase(name) for name in (*COCO_CLASSES, *VG_CLASSES)}
    for group in SYNONYM_TABLE["synonyms"]:
        assert {normalize_phrase(alias) for alias in group} & known, f"synonym group {group} adds a concept"
    for name, aliases in SYNONYM_TABLE["tag_aliases"].items():
        assert {normalize_phrase(alias) for alias in aliases} <= known, name


@pytest.mark.parametrize(
    "names",
    [
        ["bike", "bicycle", "bicycles"], ["man", "men", "guy", "gentleman"], ["tv", "television"],
        ["cellphone", "phone", "cell phone", "cell phones"], ["sofa", "couch"], ["aeroplane", "airplane", "plane"],
        ["motorbike", "motorcycle"], ["jeans", "jean"], ["sunglasses", "sunglass"], ["cookies", "cooky", "cookie"],
        ["pants", "pant", "trousers"], ["people", "person"], ["teeth", "tooth"], ["doughnut", "donuts"],
        ["tennis racket", "racket", "racquets"], ["t-shirt", "t shirt", "tee shirts"], ["circle", "disc", "disk"],
        ["diamond", "rhombus"], ["ring", "hoop"], ["skis", "ski"], ["dining table", "table"],
    ],
)  # fmt: skip
def test_default_lexicon_synonyms(names):
    lexicon = ConceptLexicon.default()
    concept_ids = {lexicon.concept_id(name) for name in names} | {lexicon.tag_concept_id(name) for name in names}
    assert len(concept_ids) == 1 and None not in concept_ids, names


def test_default_lexicon_keeps_concepts_apart():
    lexicon = ConceptLexicon.default()
    shapes = ["circle", "square", "triangle", "star", "heart", "diamond", "ring", "cross"]
    assert len({lexicon.concept_id(shape) for shape in shapes} - {None}) == len(shapes)
    assert lexicon.concept_id("box") != lexicon.concept_id("square")
    assert lexicon.concept_id("man") != lexicon.concept_id("woman") != lexicon.concept_id("person")
    assert lexicon.concept_id("glass") != lexicon.concept_id("wine glass")
    # Tag-only Visual Genome classes: adjectives, numbers, pronouns are no anchor words.
    for word in ["short", "white", "two", "an", "he", "left"]:
        assert lexicon.concept_id(word) is None and lexicon.tag_concept_id(word) is not None, word
    assert lexicon.tag_concept_id("short") == lexicon.concept_id("shorts")
    assert lexicon.tag_concept_id("man's head") == lexicon.concept_id("head")


# --------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------


def test_espresso_caption():
    words = split_words("a cup of espresso on a red saucer with a spoon")
    lexicon = ConceptLexicon.default()
    anchors = find_anchors(words, ["cup", "saucer", "spoon"], lexicon)
    assert anchors == [
        AnchorMatch(1, 2, 0, lexicon.concept_id("cup")),
        AnchorMatch(7, 8, 1, lexicon.concept_id("saucer")),
        AnchorMatch(10, 11, 2, lexicon.concept_id("spoon")),
    ]


def test_plurals_irregulars_and_synonyms_match():
    tags = ["men", "jean", "sunglass", "cooky", "man", "short", "bicycle", "television"]
    caption = "Two guys in jeans and sunglasses eat cookies, a man in shorts rides a bike past a TV"
    assert anchored(caption, tags) == [
        ("guys", "men"), ("jeans", "jean"), ("sunglasses", "sunglass"), ("cookies", "cooky"), ("man", "man"),
        ("shorts", "short"), ("bike", "bicycle"), ("tv", "television"),
    ]  # fmt: skip


def test_multi_word_tags_match_the_longest_span():
    tags = ["light", "traffic light", "tennis racket"]
    assert anchored("a traffic light and a light near a tennis racket", tags) == [
        ("traffic light", "traffic light"), ("light", "light"), ("tennis racket", "tennis racket"),
    ]  # fmt: skip
    # The longest alias wins even without a region of its concept: "traffic light" is not a "light".
    assert anchored("a traffic light", ["light"]) == []
    assert anchored("a man's T-shirt", ["t-shirt", "man"]) == [("man", "man"), ("t - shirt", "t-shirt")]


def test_head_noun_fallback_matching():
    concepts = {"racket": [], "tennis racket": [], "flag": [], "american flag": []}
    plain = ConceptLexicon(concepts)
    fallback = ConceptLexicon(concepts, head_noun_fallback=True)
    assert anchored("a tennis racket", ["racket"], plain) == []
    assert anchored("a racket", ["tennis racket"], plain) == []
    assert anchored("a tennis racket", ["racket"], fallback) == [("tennis racket", "racket")]
    assert anchored("a racket", ["tennis racket"], fallback) == [("racket", "tennis racket")]
    assert anchored("a racket", ["squash racket"], fallback) == [("racket", "squash racket")]
    words, tags = split_words("a tennis racket and a racket"), ["racket", "tennis racket"]
    # Exact pairs first, whatever the order; the head pair carries the head's concept.
    assert find_anchors(words, tags, fallback) == [AnchorMatch(1, 3, 1, 1), AnchorMatch(5, 6, 0, 0)]
    assert find_anchors(split_words("an american flag"), ["flag"], fallback) == [AnchorMatch(1, 3, 0, 2)]


def test_one_to_one_with_score_tie_break():
    lexicon = ConceptLexicon(["cup", "spoon"])
    words = split_words("a cup and a cup")
    tags = ["cup", "spoon", "cup", "cup"]
    assert find_anchors(words, tags, lexicon) == [AnchorMatch(1, 2, 0, 0), AnchorMatch(4, 5, 2, 0)]
    assert find_anchors(words, tags, lexicon, [0.2, 0.99, 0.9, 0.9]) == [
        AnchorMatch(1, 2, 2, 0), AnchorMatch(4, 5, 3, 0),  # equal scores: lower index first
    ]  # fmt: skip
    assert find_anchors(words, tags, lexicon, [0.2, 0.0, 0.5, 0.7]) == [
        AnchorMatch(1, 2, 3, 0), AnchorMatch(4, 5, 2, 0),  # words are served left to right
    ]  # fmt: skip
    assert find_anchors(["cup"], tags, lexicon, (1, 0, 3, 2)) == [AnchorMatch(0, 1, 2, 0)]


def test_repeated_words():
    lexicon = ConceptLexicon(["cup"])
    words = split_words("a cup next to a cup")
    assert find_anchors(words, ["cup", "cup"], lexicon) == [AnchorMatch(1, 2, 0, 0), AnchorMatch(5, 6, 1, 0)]
    assert find_anchors(words, ["cup"], lexicon) == [AnchorMatch(1, 2, 0, 0)]


def test_no_anchors():
    lexicon = ConceptLexicon.default()
    assert find_anchors(split_words("many small galaxies on a black sky"), ["galaxy", "star"], lexicon) == []
    assert find_anchors(split_words("the of and"), ["cup"], lexicon) == []
    assert find_anchors([], ["cup"], lexicon) == []
    assert find_anchors(split_words(""), ["cup"], lexicon) == []
    assert find_anchors(["cup"], [], lexicon) == []
    assert find_anchors(["cup"], (), lexicon, scores=[]) == []
    assert find_anchors(("a", "cup"), ("",), lexicon) == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"words": "a cup"}, r"words must be a sequence of str, got 'a cup' \(str\)"),
        ({"words": ["a", 3]}, r"words\[1\] must be a str, got 3 \(int\)"),
        ({"words": {"cup"}}, r"words must be a sequence of str, got \{'cup'\} \(set\)"),
        ({"tags": None}, r"tags must be a sequence of str, got None \(NoneType\)"),
        ({"tags": ["cup", b"cup"]}, r"tags\[1\] must be a str, got b'cup' \(bytes\)"),
        ({"lexicon": {"cup": []}}, r"lexicon must be a ConceptLexicon, got \{'cup': \[\]\} \(dict\)"),
        ({"scores": [0.5]}, r"scores must have one number per tag \(2\), got 1: \[0.5\]"),
        ({"scores": [0.5, math.nan]}, r"scores\[1\] must be a finite number, got nan"),
        ({"scores": [math.inf, 0.5]}, r"scores\[0\] must be a finite number, got inf"),
        ({"scores": [True, 0.5]}, r"scores\[0\] must be a finite number, got True"),
        ({"scores": ["0.5", 0.5]}, r"scores\[0\] must be a finite number, got '0.5'"),
        ({"scores": 0.5}, r"scores must be a sequence of finite numbers, got 0.5"),
        ({"words": ["x"] * 100 + [None]}, r"words\[100\] must be a str, got None"),
    ],
)  # fmt: skip
def test_bad_inputs(arguments, message):
    call = {"words": ["a", "cup"], "tags": ["cup", "spoon"], "lexicon": ConceptLexicon(["cup"]), "scores": None}
    with pytest.raises(ValueError, match=message):
        find_anchors(**{**call, **arguments})


def test_long_values_are_shortened_in_errors():
    with pytest.raises(ValueError) as error:
        find_anchors("cup " * 1000, ["cup"], ConceptLexicon(["cup"]))
    assert len(str(error.value)) < 200 and "..." in str(error.value)


def test_scores_from_arrays():
    numpy = pytest.importorskip("numpy")
    lexicon = ConceptLexicon(["cup"])
    scores = numpy.array([0.1, 0.9], dtype=numpy.float32)
    assert find_anchors(["cup"], ["cup", "cup"], lexicon, scores) == [AnchorMatch(0, 1, 1, 0)]
    assert find_anchors(["cup"], ["cup", "cup"], lexicon, list(scores)) == [AnchorMatch(0, 1, 1, 0)]


def test_real_image_captions(test_data_dir):
    seeds = json.loads((test_data_dir / "real_image_seeds.json").read_text())
    tags = {image: [region["tag"] for region in regions] for image, regions in seeds["regions"].items()}
    found = {image: [anchored(caption, tags[image]) for caption in seeds["captions"][image]] for image in tags}
    assert found["coffee"] == [
        [("cup", "cup"), ("saucer", "saucer"), ("spoon", "spoon")],
        [("coffee cup", "cup")],
    ]
    assert found["astronaut"] == [[], [("woman", "woman"), ("helmet", "helmet")]]
    # With the head-noun fallback, the astronaut's "american flag" meets the detector's "flag".
    fallback = ConceptLexicon.default(head_noun_fallback=True)
    assert anchored(seeds["captions"]["astronaut"][0], tags["astronaut"], fallback) == [("american flag", "flag")]
    for expression in seeds["referring_expressions"]:
        image_tags = tags[expression["image"]]
        pairs = anchored(expression["expression"], image_tags)
        if expression["expression"] == "red plate":  # a saucer is no plate
            assert pairs == []
        else:
            assert [tag for _, tag in pairs] == [expression["tag"]], expression


WORDS = ["a", "cup", "cups", "man", "men", "tennis", "racket", "traffic", "light", "t", "-", "shirt", "'", "s",
         "guy", "of", "short", "shorts", "hot", "dog", "tennis racket", ""]  # fmt: skip
TAGS = ["cup", "man", "men", "tennis racket", "racket", "traffic light", "light", "t-shirt", "short", "dog",
        "hot dog", "red car", "", "galaxy"]  # fmt: skip


def _reference_anchors(words, tags, lexicon, scores):
    """Longest alias first by brute force over every span, then each span takes the best free region."""
    spans, start = [], 0
    while start < len(words):
        for end in range(len(words), start, -1):
            concept = lexicon.concept_id(" ".join(words[start:end]))
            if concept is not None and all(normalize_phrase(word) for word in words[start:end]):
                spans.append((start, end, concept))
                start = end
                break
        else:
            start += 1
    free = list(range(len(tags)))
    anchors = []
    for start, end, concept in spans:
        candidates = [index for index in free if lexicon.tag_concept_id(tags[index]) == concept]
        if candidates:
            region = min(candidates, key=lambda index: (-(scores[index] if scores else 0.0), index))
            free.remove(region)
            anchors.append(AnchorMatch(start, end, region, concept))
    return anchors


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.sampled_from(WORDS), max_size=12),
    tags=st.lists(st.sampled_from(TAGS), max_size=8),
    data=st.data(),
)
def test_matching_agrees_with_brute_force(words, tags, data):
    lexicon = ConceptLexicon.default()
    scores = data.draw(st.none() | st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=len(tags), max_size=len(tags)))
    assert find_anchors(words, tags, lexicon, scores) == _reference_anchors(words, tags, lexicon, scores)


_ANYTHING = st.one_of(st.text(max_size=12), st.sampled_from(WORDS), st.integers(), st.none(), st.floats())


@settings(max_examples=300, deadline=None)
@given(
    words=st.one_of(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=12))), st.lists(_ANYTHING),
                    st.text(max_size=5)),
    tags=st.one_of(st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=12))), st.lists(_ANYTHING)),
    scores=st.one_of(st.none(), st.lists(st.one_of(st.floats(), st.integers(), st.booleans()), max_size=10)),
    fallback=st.booleans(),
)  # fmt: skip
def test_anchors_are_one_to_one_or_value_error(words, tags, scores, fallback):
    lexicon = ConceptLexicon.default(head_noun_fallback=fallback)
    try:
        anchors = find_anchors(words, tags, lexicon, scores)
    except ValueError:
        return
    assert isinstance(words, list) and all(isinstance(word, str) for word in words)
    assert all(isinstance(tag, str) for tag in tags)
    assert scores is None or (len(scores) == len(tags) and all(map(math.isfinite, scores)))
    assert all(isinstance(anchor, AnchorMatch) for anchor in anchors)
    assert [anchor.word_start for anchor in anchors] == sorted(anchor.word_start for anchor in anchors)
    assert len({anchor.region_index for anchor in anchors}) == len(anchors)
    for anchor, following in itertools.pairwise(anchors):
        assert anchor.word_end <= following.word_start
    for anchor in anchors:
        assert 0 <= anchor.word_start < anchor.word_end <= len(words)
        assert 0 <= anchor.region_index < len(tags)
        assert 0 <= anchor.concept_id < len(lexicon)
        if not fallback:
            assert anchor.concept_id == lexicon.concept_id(" ".join(words[anchor.word_start : anchor.word_end]))
            assert anchor.concept_id == lexicon.tag_concept_id(tags[anchor.region_index])


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


def test_anchor_statistics():
    captions = ["a cup of espresso on a red saucer", "a man and a dog", "two cups", "nothing here"]
    tags = [["cup", "saucer", "spoon"], ["man", "tree"], ("cup",), []]
    statistics = anchor_statistics(iter(captions), iter(tags), top_k=5)
    assert isinstance(statistics, AnchorStatistics)
    assert (statistics.num_captions, statistics.captions_with_anchor, statistics.num_anchors) == (4, 3, 4)
    assert statistics.share_with_anchor == 0.75 and statistics.anchors_per_caption == 1.0
    assert statistics.top_unmatched_tags == [("spoon", 1), ("tree", 1)]
    assert statistics.top_unmatched_words == [("dog", 1)]
    text = statistics.format()
    assert "captions: 4, with at least one anchor: 3 (75.0%)" in text and "spoon (1)" in text and "dog (1)" in text
    assert len(text.splitlines()) >= 4
    empty = anchor_statistics([], [], ConceptLexicon(["cup"]))
    assert (empty.num_captions, empty.share_with_anchor, empty.anchors_per_caption) == (0, 0.0, 0.0)
    assert "none" in empty.format()
    assert anchor_statistics(["cups"] * 3, [["cup"]] * 3, top_k=0).top_unmatched_tags == []


def test_anchor_statistics_rejects_bad_rows():
    with pytest.raises(ValueError, match=r"tags has fewer rows than captions \(1\)"):
        anchor_statistics(["a cup", "a cup"], [["cup"]])
    with pytest.raises(ValueError, match=r"tags has more rows than captions \(1\)"):
        anchor_statistics(["a cup"], [["cup"], ["cup"]])
    with pytest.raises(ValueError, match=r"captions\[1\] must be a str, got None"):
        anchor_statistics(["a cup", None], [["cup"], ["cup"]])
    with pytest.raises(ValueError, match=r"row 0: tags\[0\] must be a str, got 1"):
        anchor_statistics(["a cup"], [[1]])
    with pytest.raises(ValueError, match="top_k must be an int >= 0, got -1"):
        anchor_statistics([], [], top_k=-1)
    with pytest.raises(ValueError, match="lexicon must be a ConceptLexicon or None"):
        anchor_statistics([], [], ["cup"])
