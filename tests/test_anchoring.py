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
OPEN_IMAGES_CLASSES = (DATA_DIR / "open_images_classes.txt").read_text(encoding="utf-8").splitlines()
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
        ({"bike": ["cycle"], "bicycle": ["cycles"]},
         r"concepts\['bicycle'\]: alias 'cycles' normalises to 'cycle', already an alias of concept 'bike'; expected "
         r"an alias of one concept only \(an alias that is another concept's name, such as 'bike', makes that "
         r"concept a kind of 'bicycle'\)"),
        (["cup", "cups"], r"concept name 'cups' in concepts normalises to 'cup', the name of concept 'cup'; expected "
                          r"distinct names"),
        ({"": []}, r"concept name '' in concepts must be a non-empty str"),
        ({"  ": []}, r"concept name '  ' in concepts must be a non-empty str"),
        ({3: []}, r"concept name 3 in concepts must be a non-empty str"),
        ({"\x00": []}, r"concept name '\\x00' in concepts normalises to nothing; expected a word or phrase"),
        ([3], r"concepts\[0\] must be a name or a \(name, aliases\) pair, got 3"),
        ([("cup", ["mug"], "extra")], r"concepts\[0\] must be a name or a \(name, aliases\) pair"),
        ({"cup": "mug"}, r"concepts\['cup'\] must be a sequence of str \(its aliases\), got 'mug'"),
        ({"cup": [None]}, r"concepts\['cup'\]: alias None \(NoneType\) must be a str"),
        ({"cup": ["!?"]}, None),
        ({"cup": ["\x00"]}, r"concepts\['cup'\]: alias '\\x00' normalises to nothing; expected a word or phrase"),
        ({"a": ["b"], "b": ["c"], "c": ["a"]},
         r"concepts and tag_aliases make concept 'a' a kind of itself \('a' → 'c' → 'b' → 'a'\); expected kinds "
         r"without a cycle"),
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
    with pytest.raises(ValueError, match="head_noun_fallback must be a bool, got 1"):
        ConceptLexicon.default(head_noun_fallback=1)
    with pytest.raises(ValueError, match="tag_aliases key 'mug' is not a concept name; expected one of the concepts'"):
        ConceptLexicon(["cup"], tag_aliases={"mug": ["cup"]})
    with pytest.raises(ValueError, match=r"tag_aliases\['mug'\]: alias 'beakers' normalises to 'beaker', already an "
                                         r"alias of concept 'cup'"):  # fmt: skip
        ConceptLexicon({"cup": ["beaker"], "mug": []}, tag_aliases={"mug": ["beakers"]})
    with pytest.raises(ValueError, match=r"concepts\['mug'\]: alias 'beaker' normalises to 'beaker', already a tag "
                                         r"alias of concept 'cup'"):  # fmt: skip
        ConceptLexicon({"cup": [], "mug": ["beaker"]}, tag_aliases={"cup": ["beaker"]})
    with pytest.raises(ValueError, match=r"tag_aliases\['cup'\] must be a sequence of str \(its tag aliases\), got "
                                         r"'mug'"):  # fmt: skip
        ConceptLexicon(["cup"], tag_aliases={"cup": "mug"})
    with pytest.raises(ValueError, match=r"tag_aliases must be a mapping \{concept name: aliases\}, got \['cup'\]"):
        ConceptLexicon(["cup"], tag_aliases=["cup"])
    with pytest.raises(ValueError, match=r"tag_aliases\['cup'\]: alias 3 \(int\) must be a str"):
        ConceptLexicon(["cup"], tag_aliases={"cup": [3]})


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
    with pytest.raises(ValueError, match=r"concepts\['scooter'\]: alias 'vespa' normalises to 'vespa', already a "
                                         r"tag alias of concept 'saucer'"):  # fmt: skip
        extended.extend({"scooter": ["vespa"]}, tag_aliases={"saucer": ["vespa"]})
    with pytest.raises(ValueError, match=r"concepts\[0\] must be a name or a \(name, aliases\) pair, got 3"):
        lexicon.extend([3])
    with pytest.raises(ValueError, match="tag_aliases key 'mug' is not a concept name"):
        lexicon.extend(["saucer"], tag_aliases={"mug": ["cup"]})
    default = ConceptLexicon.default()
    assert default.extend(["rhombicosidodecahedron"]).concept_id("rhombicosidodecahedron") == len(default)


def test_an_alias_that_names_another_concept_makes_a_kind():
    names = ["person", "woman", "dog", "puppy"]
    via_extend = ConceptLexicon(names).extend({"person": ["woman"], "dog": ["puppy"]})
    via_tag_aliases = ConceptLexicon(names, tag_aliases={"woman": ["person"], "puppy": ["dogs"]})
    via_constructor = ConceptLexicon({"person": ["women"], "woman": [], "dog": ["puppies"], "puppy": []})
    person, woman, dog, puppy = range(4)
    for lexicon in (via_extend, via_tag_aliases, via_constructor):
        assert lexicon.concept_names == names  # no concept added, every id kept
        assert lexicon.concept_id("woman") == lexicon.tag_concept_id("woman") == woman
        assert lexicon.tag_concept_id("person") == person and lexicon.concept_id("puppy") == puppy
        assert lexicon.broader_concept_ids(woman) == [person] and lexicon.broader_concept_ids(puppy) == [dog]
        assert lexicon.broader_concept_ids(person) == [] == lexicon.broader_concept_ids(dog)
        # Both directions pair, labelled with the broader concept: the one that both the word and the tag name.
        words = split_words("a woman walks her puppy")
        assert find_anchors(words, ["dog", "person"], lexicon) == [AnchorMatch(1, 2, 1, person),
                                                                    AnchorMatch(4, 5, 0, dog)]
        assert find_anchors(split_words("a person and a dog"), ["puppy", "woman"], lexicon) == [
            AnchorMatch(1, 2, 1, person), AnchorMatch(4, 5, 0, dog)]
        assert ConceptLexicon.from_dict(lexicon.to_dict()) == lexicon
        assert ConceptLexicon.from_dict(lexicon.to_dict()).broader_concept_ids(woman) == [person]


def test_issue_calls_on_the_default_lexicon():
    default = ConceptLexicon.default()
    person, woman = default.concept_id("person"), default.concept_id("woman")
    for lexicon in (default.extend({"person": ["woman"]}), default.extend({}, tag_aliases={"woman": ["person"]}),
                    default.extend({"dog": ["puppy"]})):
        assert len(lexicon) == len(default) and lexicon.concept_names == default.concept_names
        assert person in lexicon.broader_concept_ids(woman)
    # An existing alias of another concept (not only its name) makes that concept a kind, too.
    extended = default.extend({"tool": ["lady"]})
    assert default.concept_id("tool") in extended.broader_concept_ids(woman)
    # A new word is a new alias of the concept it is given to.
    assert default.concept_id("doggo") is None
    assert default.extend({"dog": ["doggo"]}).concept_id("doggos") == default.concept_id("dog")


def test_kinds_pair_after_exact_pairs_nearest_first():
    lexicon = ConceptLexicon({"animal": ["dog"], "dog": ["puppy"], "puppy": [], "person": ["man", "woman"],
                              "man": [], "woman": []})  # fmt: skip
    animal, dog, puppy, person = range(4)
    assert lexicon.broader_concept_ids(puppy) == [dog, animal]  # transitive, nearest first
    # Same concept first, whatever the order of words and regions.
    assert anchored("a man next to a person", ["person", "man"], lexicon) == [("man", "man"), ("person", "person")]
    assert anchored("a woman next to a man", ["person", "man"], lexicon) == [("woman", "person"), ("man", "man")]
    # The nearest related region, then the higher score, then the lower index.
    assert find_anchors(["puppy"], ["animal", "dog"], lexicon) == [AnchorMatch(0, 1, 1, dog)]
    assert find_anchors(["puppy"], ["animal"], lexicon) == [AnchorMatch(0, 1, 0, animal)]
    assert find_anchors(["animal"], ["puppy"], lexicon) == [AnchorMatch(0, 1, 0, animal)]
    assert find_anchors(["man"], ["person", "person"], lexicon, [0.2, 0.9]) == [AnchorMatch(0, 1, 1, person)]
    assert find_anchors(["man"], ["person", "person"], lexicon) == [AnchorMatch(0, 1, 0, person)]
    # Siblings are no kinds of each other.
    assert anchored("a man", ["woman"], lexicon) == [] and anchored("a dog", ["man"], lexicon) == []
    # One-to-one across passes: the kind pair only takes what the exact pairs left.
    assert anchored("a man and a woman", ["man", "person"], lexicon) == [("man", "man"), ("woman", "person")]
    assert anchored("a man and a woman", ["person"], lexicon) == [("man", "person")]


def test_kinds_with_head_noun_fallback():
    lexicon = ConceptLexicon({"racket": [], "tennis racket": [], "person": ["player"], "player": []},
                             head_noun_fallback=True)
    racket, person = 0, 2
    words = split_words("a player with a squash racket")
    assert find_anchors(words, ["tennis racket", "person"], lexicon) == [AnchorMatch(1, 2, 1, person),
                                                                         AnchorMatch(5, 6, 0, racket)]


def test_broader_concept_ids_rejects_bad_ids():
    lexicon = ConceptLexicon(["cup"])
    for bad in (1, -1, "0", None, True, 0.0):
        with pytest.raises(ValueError, match=r"concept_id must be an int in \[0, 1\), got "):
            lexicon.broader_concept_ids(bad)


def test_lexicon_calls_reject_bad_arguments(tmp_path):
    lexicon = ConceptLexicon(["cup"])
    with pytest.raises(ValueError, match=r"phrase must be a str, got 3 \(int\)"):
        lexicon.concept_id(3)
    with pytest.raises(ValueError, match=r"tag must be a str, got None \(NoneType\)"):
        lexicon.tag_concept_id(None)
    with pytest.raises(ValueError, match="path must be a str or Path of a lexicon JSON file, got 3"):
        ConceptLexicon.load(3)
    with pytest.raises(ValueError, match="cannot be read as a lexicon JSON file"):
        ConceptLexicon.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="path must be a str or Path to write the lexicon to, got None"):
        lexicon.save(None)
    with pytest.raises(ValueError, match=r"concepts must be a mapping .*, got 'cup'"):
        lexicon.extend("cup")


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
    assert [name for name in VG_CLASSES
            if lexicon.concept_id(name) is None and normalize_phrase(name) not in tag_only] == []  # fmt: skip


def test_synonym_table_only_merges_known_classes():
    known = {normalize_phrase(name) for name in (*COCO_CLASSES, *VG_CLASSES)}
    for group in SYNONYM_TABLE["synonyms"]:
        assert {normalize_phrase(alias) for alias in group} & known, f"synonym group {group} adds a concept"
    known |= {normalize_phrase(name) for name in OPEN_IMAGES_CLASSES}
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


def test_kinds_table_adds_no_concept():
    known = {normalize_phrase(alias) for group in SYNONYM_TABLE["synonyms"] for alias in group}
    known |= {normalize_phrase(name) for name in (*COCO_CLASSES, *VG_CLASSES)}
    assert [name for name in SYNONYM_TABLE["kinds"] if normalize_phrase(name) not in known] == []
    tag_only = {normalize_phrase(alias) for aliases in SYNONYM_TABLE["tag_aliases"].values() for alias in aliases}
    assert [word for words in SYNONYM_TABLE["kinds"].values() for word in words
            if normalize_phrase(word) in tag_only] == []  # fmt: skip


# The words captions use for objects that COCO detectors tag (also the Visual Genome classes among them).
CAPTION_WORDS = {
    "person": ["man", "men", "woman", "women", "girl", "girls", "lady", "ladies", "boy", "boys", "child",
               "children", "kid", "kids", "people", "persons", "guy", "baby", "toddler", "teenager", "player",
               "players", "tennis player", "skier", "surfer", "skateboarder", "snowboarder", "batter", "catcher",
               "umpire", "rider", "biker", "cyclist", "spectators", "pedestrian", "police officer", "chef",
               "mother", "father", "bride", "groom", "passenger", "worker", "students", "tourists"],
    "bicycle": ["bike", "bikes", "mountain bike"], "car": ["cars", "taxi", "cab", "suv", "van", "jeep", "sedan"],
    "motorcycle": ["motorbike", "moped", "scooter", "dirt bike"], "airplane": ["plane", "jet", "airliner", "jets"],
    "bus": ["buses", "school bus", "double decker bus"], "train": ["locomotive", "subway", "train car", "tram"],
    "truck": ["pickup truck", "pickup", "fire truck", "van", "lorry", "dump truck"],
    "boat": ["sailboat", "ship", "canoe", "kayak", "yacht", "ferry"], "traffic light": ["stoplight"],
    "fire hydrant": ["hydrant"], "stop sign": ["sign"], "parking meter": ["meter"], "bench": ["park bench"],
    "bird": ["duck", "seagull", "pigeons", "goose", "swan", "parrot"], "cat": ["kitten", "kittens", "kitty"],
    "dog": ["puppy", "puppies", "pup", "doggy"], "horse": ["pony", "ponies", "foal"], "sheep": ["lamb", "lambs", "ram"],
    "cow": ["calf", "bull", "cattle", "ox"], "bear": ["polar bear", "cub", "grizzly bear"],
    "elephant": ["baby elephant"], "backpack": ["bag", "rucksack"], "umbrella": ["parasol"],
    "handbag": ["purse", "bag"], "tie": ["bow tie", "necktie"], "suitcase": ["luggage", "bag"],
    "sports ball": ["ball", "soccer ball", "tennis ball", "football"], "baseball bat": ["bat"],
    "baseball glove": ["glove", "mitt"], "skateboard": ["board"], "surfboard": ["board"], "skis": ["ski"],
    "tennis racket": ["racket", "racquet"], "bottle": ["water bottle", "wine bottle"], "wine glass": ["glass"],
    "cup": ["mug", "coffee cup"], "fork": ["utensil"], "banana": ["fruit"], "orange": ["tangerine"],
    "sandwich": ["hamburger", "burger", "sub"], "hot dog": ["hotdog"], "pizza": ["pizza slice"],
    "donut": ["doughnut"], "cake": ["cupcake"], "chair": ["armchair", "stool"], "couch": ["sofa"],
    "potted plant": ["plant", "houseplant"], "dining table": ["table", "coffee table"], "tv": ["television", "monitor"],
    "laptop": ["computer", "laptop computer"], "remote": ["controller", "remote control"],
    "cell phone": ["phone", "cellphone", "smartphone"], "oven": ["stove"], "refrigerator": ["fridge", "freezer"],
    "teddy bear": ["teddy", "stuffed animal", "toy"], "hair drier": ["hair dryer", "blow dryer"],
    "toothbrush": ["tooth brush"],
}  # fmt: skip
# The other direction: a caption's broader word, a detector's narrower tag.
for _tag in ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"):
    CAPTION_WORDS.setdefault(_tag, []).append("animal")
for _tag in ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"):
    CAPTION_WORDS[_tag].append("vehicle")
for _tag in ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"):
    CAPTION_WORDS.setdefault(_tag, []).append("food")


@pytest.mark.parametrize("tag, word", [(tag, word) for tag, words in CAPTION_WORDS.items() for word in words])
def test_coco_tags_anchor_the_words_of_captions(tag, word):
    lexicon = ConceptLexicon.default()
    words = split_words(f"there is the {word} here")
    anchors = find_anchors(words, ["tree", tag], lexicon)
    assert [(anchor.word_start, anchor.word_end, anchor.region_index) for anchor in anchors] == [
        (3, 3 + len(split_words(word)), 1)]
    # The pair's concept is the broader of the two (or their one concept): both the word and the tag name it.
    word_concept, tag_concept = lexicon.concept_id(word), lexicon.tag_concept_id(tag)
    concept = anchors[0].concept_id
    assert concept in {word_concept, tag_concept}
    narrower = word_concept if concept == tag_concept else tag_concept
    assert narrower == concept or concept in lexicon.broader_concept_ids(narrower)


# The plural people write for each COCO class where it is not the name plus "s".
COCO_PLURALS = {
    "person": "people", "bus": "buses", "bench": "benches", "sheep": "sheep", "skis": "skis", "knife": "knives",
    "sandwich": "sandwiches", "broccoli": "broccoli", "couch": "couches", "mouse": "mice", "scissors": "scissors",
    "wine glass": "wine glasses", "toothbrush": "toothbrushes", "tv": "tvs",
}  # fmt: skip


@pytest.mark.parametrize("name", COCO_CLASSES)
def test_every_coco_class_anchors_its_name_and_plural(name):
    lexicon = ConceptLexicon.default()
    plural = COCO_PLURALS.get(name, f"{name}s")
    for caption, word in ((f"a photo of a {name} today", name), (f"two {plural} in a row", plural)):
        words = split_words(caption)
        start = words.index(split_words(word)[0])
        assert find_anchors(words, [name], lexicon) == [
            AnchorMatch(start, start + len(split_words(word)), 0, lexicon.tag_concept_id(name))], caption



# Open Images boxable classes that no concept of the default lexicon fits: a new concept would change the AMC label
# space of every model trained with it, so these anchor nothing until one is added knowingly.
OPEN_IMAGES_WITHOUT_CONCEPT = {
    "Accordion", "Auto part", "Band-aid", "Banjo", "Bathroom accessory", "Beehive", "Binoculars", "Bomb",
    "Bow and arrow", "Cannon", "Cello", "Cooking spray", "Diaper", "Dice", "Eraser", "Fashion accessory", "Flute",
    "French horn", "Harmonica", "Harp", "Honeycomb", "Maracas", "Missile", "Musical instrument", "Oboe",
    "Office supplies", "Pencil sharpener", "Rocket", "Ruler", "Saxophone", "Trombone", "Trumpet", "Violin",
}  # fmt: skip
_TAG_ONLY = {normalize_phrase(alias) for aliases in SYNONYM_TABLE["tag_aliases"].values() for alias in aliases}


def test_open_images_classes_name_concepts():
    assert len(OPEN_IMAGES_CLASSES) == len(set(OPEN_IMAGES_CLASSES)) == 601
    lexicon = ConceptLexicon.default()
    assert {name for name in OPEN_IMAGES_CLASSES if lexicon.tag_concept_id(name) is None} == OPEN_IMAGES_WITHOUT_CONCEPT
    # Qualified names ("Bat (Animal)") and lists ("Luggage and bags") are tags only.
    assert lexicon.tag_concept_id("Bat (Animal)") == lexicon.concept_id("animal") != lexicon.concept_id("bat")
    assert lexicon.tag_concept_id("Luggage and bags") == lexicon.concept_id("bag")


@pytest.mark.parametrize(
    "name",
    [name for name in OPEN_IMAGES_CLASSES
     if name not in OPEN_IMAGES_WITHOUT_CONCEPT and normalize_phrase(name) not in _TAG_ONLY],
)  # fmt: skip
def test_open_images_classes_anchor_their_names(name):
    words = split_words(f"a photo of {name.lower()} today")
    anchors = find_anchors(words, ["cloud", name], ConceptLexicon.default())
    assert [(anchor.word_start, anchor.word_end, anchor.region_index) for anchor in anchors] == [
        (3, 3 + len(split_words(name)), 1)]


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
         "guy", "of", "short", "shorts", "hot", "dog", "tennis racket", "", "person", "woman", "boy", "player",
         "puppy", "animal", "pickup", "truck"]  # fmt: skip
TAGS = ["cup", "man", "men", "tennis racket", "racket", "traffic light", "light", "t-shirt", "short", "dog",
        "hot dog", "red car", "", "galaxy", "person", "people", "child", "animal", "truck", "pickup truck"]  # fmt: skip


def _reference_anchors(words, tags, lexicon, scores):
    """Longest alias first by brute force over every span, then each span takes the best free region of its
    concept, then of the nearest kind."""
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
    anchors, unpaired = [], []
    for start, end, concept in spans:
        candidates = [index for index in free if lexicon.tag_concept_id(tags[index]) == concept]
        if candidates:
            region = min(candidates, key=lambda index: (-(scores[index] if scores else 0.0), index))
            free.remove(region)
            anchors.append(AnchorMatch(start, end, region, concept))
        else:
            unpaired.append((start, end, concept))
    # Then kinds: the region whose concept is nearest above or below the span's, labelled with the broader one.
    for start, end, concept in unpaired:
        related = []
        for index in free:
            tag_concept = lexicon.tag_concept_id(tags[index])
            for narrower, broader in ((concept, tag_concept), (tag_concept, concept)):
                if tag_concept is not None and broader in lexicon.broader_concept_ids(narrower):
                    steps = lexicon._broader[narrower][broader]
                    related.append(((steps, -(scores[index] if scores else 0.0), index), index, broader))
        if related:
            _, region, broader = min(related)
            free.remove(region)
            anchors.append(AnchorMatch(start, end, region, broader))
    return sorted(anchors, key=lambda anchor: anchor.word_start)


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
        if not fallback:  # one concept, or the broader of a kind pair
            word_concept = lexicon.concept_id(" ".join(words[anchor.word_start : anchor.word_end]))
            tag_concept = lexicon.tag_concept_id(tags[anchor.region_index])
            assert anchor.concept_id in {word_concept, tag_concept}
            narrower = word_concept if anchor.concept_id == tag_concept else tag_concept
            assert narrower == anchor.concept_id or anchor.concept_id in lexicon.broader_concept_ids(narrower)


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


def test_docs_example_extending_the_lexicon(capsys):
    readme = (Path(__file__).parent.parent / "docs" / "processor.md").read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index("Extending the lexicon")) + len("```python\n")
    example = readme[start : readme.index("```", start)]
    exec(compile(example, "docs/processor.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == [line[2:] for line in example.splitlines() if line.startswith("# ")] and len(printed) == 4
