"""Anchor operator ⊕ of CMAL: which word of a caption names which detected region (docs/processor.md).

Words and detector tags are normalised the same way (lower case, accents stripped, punctuation split off like
BERT's basic tokenizer, every word made singular by English rules plus an irregular list) and looked up in a
`ConceptLexicon`, which maps aliases (`bike`, `bicycle`) to concept ids and knows which concepts are kinds of
others (`woman` of `person`, `puppy` of `dog`); a few detector classes that are other kinds of words in captions
(`short`, `white`, `two`) name their concept in tags only. `find_anchors` then pairs words with regions
one-to-one, longest multi-word alias first, same concept before kinds (a detector's `person` anchors "woman").
The concept id of a pair is the AMC label (for kinds the broader concept, which both sides name), so the lexicon
travels with the processor. `anchor_statistics` reports how well a corpus anchors.

Remote code: this module imports only the Python standard library.
"""

from __future__ import annotations

import json
import math
import numbers
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

_DATA_DIR = Path(__file__).parent / "data"
_LEXICON_FORMAT = "cmal-concept-lexicon"
_LEXICON_VERSION = 1

# --------------------------------------------------------------------------------------------------------------
# Word split (what BERT's normaliser and pre-tokenizer do to uncased text)
# --------------------------------------------------------------------------------------------------------------

_ASCII_PUNCTUATION = "".join(chr(code) for code in (*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127)))
# ASCII control characters are deleted (tab, newline and carriage return count as white space), punctuation
# becomes a word of its own.
_ASCII_SPLIT_TABLE = str.maketrans(
    {
        **{chr(code): None for code in (*range(9), 11, 12, *range(14, 32), 127)},
        **{mark: f" {mark} " for mark in _ASCII_PUNCTUATION},
    }
)
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


def _is_cjk(code: int) -> bool:
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _split_unicode(text: str) -> list[str]:
    cleaned = []
    for char in text:
        code = ord(char)
        if code == 0 or code == 0xFFFD or (char not in "\t\n\r" and unicodedata.category(char).startswith("C")):
            continue
        if char.isspace():
            cleaned.append(" ")
        elif _is_cjk(code):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    decomposed = unicodedata.normalize("NFD", "".join(cleaned))
    # Lower-case one character at a time, as the Rust normaliser does (no final-sigma rule).
    letters = "".join(char.lower() for char in decomposed if unicodedata.category(char) != "Mn")
    spaced = "".join(
        f" {char} " if char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P") else char
        for char in letters
    )
    return spaced.split()


def split_words(text: str) -> list[str]:
    """Split `text` into lower-case words the way BERT's uncased tokenizer does before word pieces.

    Control characters are dropped, accents stripped, CJK characters and punctuation marks become words of their
    own: `"A man's T-shirt"` → `["a", "man", "'", "s", "t", "-", "shirt"]`. Use it when no tokenizer is at hand;
    with a tokenizer, its word ids give the same words.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {_shorten(text)} ({type(text).__name__})")
    if text.isascii():
        return text.lower().translate(_ASCII_SPLIT_TABLE).split()
    return _split_unicode(text)


# --------------------------------------------------------------------------------------------------------------
# Singular forms
# --------------------------------------------------------------------------------------------------------------

# Plurals no rule gets right. "people" is made "person" so that the two Visual Genome classes meet.
_IRREGULAR_PLURALS = {
    "oxen": "ox", "mice": "mouse", "dormice": "dormouse", "lice": "louse", "lives": "life", "busses": "bus",
    "quizzes": "quiz", "axes": "axe", "menus": "menu", "emus": "emu", "gnus": "gnu", "tutus": "tutu",
    "haikus": "haiku", "tofus": "tofu", "gurus": "guru", "cacti": "cactus", "fungi": "fungus",
    "octopi": "octopus", "radii": "radius", "stimuli": "stimulus", "nuclei": "nucleus", "alumni": "alumnus",
    "criteria": "criterion", "phenomena": "phenomenon", "bacteria": "bacterium", "antennae": "antenna",
    "vertebrae": "vertebra", "larvae": "larva", "indices": "index", "matrices": "matrix", "vertices": "vertex",
    "appendices": "appendix", "analyses": "analysis", "crises": "crisis", "theses": "thesis", "oases": "oasis",
    "diagnoses": "diagnosis", "parentheses": "parenthesis", "hypotheses": "hypothesis", "ellipses": "ellipsis",
    "synopses": "synopsis", "emphases": "emphasis",
}  # fmt: skip
# Irregular endings that compounds share ("policemen", "bookshelves", "grandchildren", "townspeople").
_IRREGULAR_ENDINGS = (
    ("people", "person"), ("children", "child"), ("feet", "foot"), ("teeth", "tooth"), ("geese", "goose"),
    ("shelves", "shelf"), ("knives", "knife"), ("wives", "wife"), ("wolves", "wolf"), ("leaves", "leaf"),
    ("loaves", "loaf"), ("halves", "half"), ("calves", "calf"), ("scarves", "scarf"), ("thieves", "thief"),
    ("hooves", "hoof"), ("elves", "elf"), ("men", "man"),
)  # fmt: skip
_IRREGULAR_SUFFIXES = tuple(plural for plural, _ in _IRREGULAR_ENDINGS)
_NOT_MEN_PLURALS = frozenset({
    "specimen", "omen", "abdomen", "stamen", "ramen", "semen", "regimen", "hymen", "amen", "acumen", "albumen",
    "bitumen", "lumen", "rumen", "nomen", "cognomen", "cerumen", "dolmen", "foramen", "gravamen", "cyclamen",
    "yemen", "carmen", "germen"
})  # fmt: skip
# Words that end in "s" and are singular (or have no singular worth making). "shorts" stays: "short" is the
# adjective. Words ending in "ss", "us" and "-sis"/"-itis" are singular by rule.
_SINGULAR_S_WORDS = frozenset({
    "this", "his", "is", "was", "has", "its", "yes", "as", "us", "does", "lens", "gas", "canvas", "atlas", "bias",
    "alias", "christmas", "news", "series", "species", "chaos", "cosmos", "kudos", "ethos", "pathos", "asbestos",
    "always", "perhaps", "whereas", "sometimes", "besides", "towards", "afterwards", "upwards", "downwards",
    "backwards", "forwards", "outdoors", "indoors", "overseas", "nowadays", "sideways", "shorts", "clothes",
    "mathematics", "physics", "economics", "politics", "athletics", "gymnastics", "aerobics", "ethics", "corps",
    "headquarters", "barracks", "crossroads", "innings", "measles", "mumps", "diabetes", "herpes", "rabies", "ours",
    "yours", "hers", "theirs", "tennis", "iris", "axis", "chassis", "trellis", "pelvis", "penis", "debris",
    "marquis", "mantis", "ibis", "hubris", "clematis", "glottis", "epidermis", "dermis", "cannabis"
})  # fmt: skip
# Singulars in "-s" whose plural adds "es"; other "-ses" plurals only add "s" ("houses" → "house").
_ES_PLURAL_STEMS = frozenset({
    "bus", "minibus", "omnibus", "trolleybus", "airbus", "lens", "gas", "canvas", "atlas", "bias", "alias",
    "christmas", "cactus", "virus", "campus", "octopus", "bonus", "circus", "chorus", "walrus", "genius", "status",
    "census", "abacus", "citrus", "hippopotamus", "platypus", "fungus", "asparagus", "hibiscus", "crocus",
    "eucalyptus", "apparatus", "prospectus", "syllabus", "thesaurus", "stimulus", "nucleus", "lotus", "plus",
    "minus", "surplus", "sinus", "iris", "trellis", "pelvis", "penis", "mantis", "ibis"
})  # fmt: skip
# Singulars in "-o" whose plural is "-oes" (others, like "shoe" and "canoe", only add "s").
_OES_PLURAL_STEMS = frozenset({
    "tomato", "potato", "hero", "echo", "volcano", "mango", "buffalo", "mosquito", "torpedo", "domino", "tornado",
    "flamingo", "avocado", "cargo", "grotto", "halo", "motto", "zero", "tuxedo", "veto", "embargo", "go"
})  # fmt: skip
# Singulars in "-che" ("mustaches" → "mustache", not "mustach").
_CHE_NOUNS = frozenset({
    "mustache", "moustache", "ache", "headache", "earache", "toothache", "stomachache", "backache", "heartache",
    "niche", "cache", "avalanche", "quiche", "cliche", "psyche", "creche", "panache", "attache", "microfiche",
    "douche", "gouache", "tranche", "brioche", "cloche", "pastiche"
})  # fmt: skip
# Singulars in "-ie" ("cookies" → "cookie", not "cooky").
_IE_NOUNS = frozenset({
    "cookie", "movie", "beanie", "veggie", "goalie", "brownie", "hoodie", "selfie", "zombie", "calorie", "rookie",
    "smoothie", "auntie", "genie", "prairie", "pixie", "birdie", "bootie", "collie", "hippie", "magpie", "necktie",
    "bowtie", "potpie", "budgie", "boogie", "eyrie", "sortie", "coterie", "lingerie", "rotisserie", "patisserie",
    "brasserie", "menagerie", "reverie", "talkie"
})  # fmt: skip


def singularize(word: str) -> str:
    """The singular of an English noun, lower-cased: `"Cherries"` → `"cherry"`, `"men"` → `"man"`.

    Rules for regular plurals plus an irregular list; singular words ending in "s" (`bus`, `glass`, `tennis`,
    `this`, `series`) are left alone, `"people"` becomes `"person"`, and `"shorts"` stays (`"short"` is an
    adjective). Works on one word; see `normalize_phrase` for text.
    """
    if not isinstance(word, str):
        raise ValueError(f"word must be a str, got {_shorten(word)} ({type(word).__name__})")
    return _singular(word.lower())


@lru_cache(maxsize=1 << 16)
def _singular(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(_IRREGULAR_SUFFIXES) and word not in _NOT_MEN_PLURALS:
        for plural, singular in _IRREGULAR_ENDINGS:
            if word.endswith(plural):
                return word[: -len(plural)] + singular
    if len(word) < 3 or not word.endswith("s") or word in _SINGULAR_S_WORDS:
        return word
    if word.endswith(("ss", "us", "sis", "itis", "polis")):
        return word
    if word.endswith("ies"):
        if len(word) <= 4 or word[:-1] in _IE_NOUNS:  # "ties", "pies"
            return word[:-1]
        return word[:-3] + "y"
    if word.endswith("es"):
        stem = word[:-2]
        if stem in _ES_PLURAL_STEMS or stem.endswith("ss"):
            return stem
        if stem.endswith(("sh", "ch", "x", "zz")):
            return word[:-1] if word[:-1] in _CHE_NOUNS else stem
        if stem.endswith("o") and stem in _OES_PLURAL_STEMS:
            return stem
    return word[:-1]


def normalize_phrase(phrase: str) -> str:
    """Lower-case `phrase`, split it like `split_words`, make every word singular and join with single spaces.

    `"Tennis  Rackets"` → `"tennis racket"`, `"T-shirts"` → `"t - shirt"` (punctuation stays a word of its own, as
    the tokenizer's words have it, so that tags and caption words meet).
    """
    if not isinstance(phrase, str):
        raise ValueError(f"phrase must be a str, got {_shorten(phrase)} ({type(phrase).__name__})")
    return _normalized(phrase)


@lru_cache(maxsize=1 << 16)
def _normalized(phrase: str) -> str:
    return " ".join(_singular(word) for word in split_words(phrase))


def _shorten(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters for an error message (the one helper of the runtime files)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Concept lexicon
# --------------------------------------------------------------------------------------------------------------

# The 80 COCO detection classes, in the order of the COCO category ids.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


class ConceptLexicon:
    """Concepts that anchors may name, each with the aliases that name it in captions and in detector tags.

    A concept's id is its position (0 … `len(lexicon) - 1`, in the order given): it is the AMC label, so ids
    never move; `extend` only appends. Every alias is normalised (`normalize_phrase`) and names exactly one
    concept. A concept's canonical name is one of its aliases.

    **Kinds.** An alias that is the name of *another* concept says that concept is a kind of this one:
    `{"person": ["woman"], "woman": ["lady"]}` keeps `woman` a concept of its own and makes it a kind of `person`.
    A tag alias that is another concept's name says the reverse (a region with that tag may show this concept):
    `tag_aliases={"woman": ["person"]}` also makes `woman` a kind of `person`. Kinds are transitive (`puppy` →
    `dog` → `animal`) and must not form a cycle. After the exact pairs, `find_anchors` pairs a caption word and a
    region when the concept of one is a kind of the other's ("a woman" ↔ tag `person`, "an animal" ↔ tag `dog`),
    and the pair carries the *broader* concept: the one both the word and the tag name, so that the AMC target can
    be read from either modality (a `person` region does not say `woman`; the word "animal" does not say `dog`).

    Args:
        concepts: `{name: aliases}`, or a sequence of names and `(name, aliases)` pairs; aliases is a sequence of
            strings, the words that name the concept in captions and tags (or, as above, its kinds).
        head_noun_fallback: when a phrase is no alias, use its last word (`"squash racket"` → `racket`), and let
            `find_anchors` pair words and regions that share a head concept (`racket` ↔ `tennis racket`) after
            the exact pairs and kinds.
        tag_aliases: `{name: aliases}` that name a concept in detector tags only, for tags that are words of
            another kind in a caption (Visual Genome's `short` is shorts, the caption word "short" an adjective).

    `ConceptLexicon.default()` covers the COCO-80 and Visual Genome 1600 classes.
    """

    def __init__(
        self,
        concepts: Mapping[str, Sequence[str]] | Sequence[str | tuple[str, Sequence[str]]],
        *,
        head_noun_fallback: bool = False,
        tag_aliases: Mapping[str, Sequence[str]] | None = None,
    ):
        if not isinstance(head_noun_fallback, bool):
            raise ValueError(f"head_noun_fallback must be a bool, got {_shorten(head_noun_fallback)}")
        entries = _concept_entries(concepts)
        extra_tags = _tag_alias_entries(tag_aliases, [name for name, _ in entries])
        self._build([(name, aliases, extra_tags.get(name, ())) for name, aliases in entries], head_noun_fallback)

    def _build(self, entries: list[tuple[str, Sequence[str], Sequence[str]]], head_noun_fallback: bool) -> None:
        """Index `(name, aliases, tag aliases)` entries; aliases that normalise alike within a concept are dropped.

        Names are indexed first, so that an alias naming a later concept is a kind, whatever the order.
        """
        names = [name for name, _, _ in entries]
        name_index: dict[str, int] = {}
        for concept_id, name in enumerate(names):
            key = normalize_phrase(name)
            if not key:
                raise ValueError(f"concept name {name!r} in concepts normalises to nothing; expected a word or phrase")
            if key in name_index:
                raise ValueError(f"concept name {name!r} in concepts normalises to {key!r}, the name of concept "
                                 f"{names[name_index[key]]!r}; expected distinct names")
            name_index[key] = concept_id
        caption_index, tag_index = dict(name_index), dict(name_index)
        is_tag_only: set[str] = set()
        broader: list[set[int]] = [set() for _ in names]
        aliases_of, tag_aliases_of = [], []
        for concept_id, (name, aliases, tag_aliases) in enumerate(entries):
            kept_aliases, kept_tag_aliases = [], []
            alias_lists = (("concepts", aliases, kept_aliases), ("tag_aliases", tag_aliases, kept_tag_aliases))
            for argument, given, kept in alias_lists:
                for alias in given:
                    key = _alias_key(alias, name, argument)
                    other = name_index.get(key, concept_id)
                    if other != concept_id:  # another concept's name: a kind
                        narrower, wider = (other, concept_id) if argument == "concepts" else (concept_id, other)
                        if wider not in broader[narrower]:
                            broader[narrower].add(wider)
                            kept.append(alias)
                        continue
                    owner = tag_index.get(key, concept_id)
                    if owner != concept_id:
                        held = "a tag alias" if key in is_tag_only else "an alias"
                        raise ValueError(
                            f"{argument}[{name!r}]: alias {alias!r} normalises to {key!r}, already {held} of "
                            f"concept {names[owner]!r}; expected an alias of one concept only (an alias that "
                            f"is another concept's name, such as {names[owner]!r}, makes that concept a kind of "
                            f"{name!r})"
                        )
                    if key in tag_index:
                        continue  # this concept's already
                    tag_index[key] = concept_id
                    if argument == "concepts":
                        caption_index[key] = concept_id
                    else:
                        is_tag_only.add(key)
                    kept.append(alias)
            aliases_of.append(tuple(kept_aliases))
            tag_aliases_of.append(tuple(kept_tag_aliases))
        self._names = tuple(names)
        self._aliases = tuple(aliases_of)
        self._tag_aliases = tuple(tag_aliases_of)
        self._broader = _transitive_kinds(broader, names)
        # Both directions for matching: {concept: {related concept: (steps, the broader of the two)}}.
        self._related: dict[int, dict[int, tuple[int, int]]] = {}
        for narrower, steps_to in self._broader.items():
            for wider, steps in steps_to.items():
                self._related.setdefault(narrower, {})[wider] = (steps, wider)
                self._related.setdefault(wider, {})[narrower] = (steps, wider)
        self._head_noun_fallback = head_noun_fallback
        self._caption_index = caption_index
        self._tag_index = tag_index
        # Every proper word prefix of a multi-word alias: a caption span only grows while it is one.
        self._prefixes = frozenset(
            " ".join(words[:length])
            for words in (key.split(" ") for key in caption_index if " " in key)
            for length in range(1, len(words))
        )
        self._tag_cache: dict[str, tuple[int | None, int | None]] = {}
        self._hash: int | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Lookups

    @property
    def concept_names(self) -> list[str]:
        """Canonical name of every concept, by id (a copy)."""
        return list(self._names)

    @property
    def head_noun_fallback(self) -> bool:
        return self._head_noun_fallback

    def __len__(self) -> int:
        return len(self._names)

    def concept_id(self, phrase: str) -> int | None:
        """Id of the concept that caption text `phrase` names (normalised, exact alias), or None."""
        key = normalize_phrase(phrase)
        concept = self._caption_index.get(key)
        if concept is None and self._head_noun_fallback and " " in key:
            concept = self._caption_index.get(key.rsplit(" ", 1)[1])
        return concept

    def tag_concept_id(self, tag: str) -> int | None:
        """Id of the concept that detector tag `tag` names (aliases and tag aliases), or None."""
        if not isinstance(tag, str):
            raise ValueError(f"tag must be a str, got {_shorten(tag)} ({type(tag).__name__})")
        exact, head = self._tag_concepts(tag)
        return exact if exact is not None else head

    def broader_concept_ids(self, concept_id: int) -> list[int]:
        """Ids of the concepts that concept `concept_id` is a kind of, transitively, nearest first (then by id)."""
        if isinstance(concept_id, bool) or not isinstance(concept_id, numbers.Integral) or not (
            0 <= concept_id < len(self._names)
        ):
            raise ValueError(f"concept_id must be an int in [0, {len(self._names)}), got {_shorten(concept_id)}")
        steps = self._broader.get(int(concept_id), {})
        return sorted(steps, key=lambda broader: (steps[broader], broader))

    def _tag_concepts(self, tag: str) -> tuple[int | None, int | None]:
        """`(concept of the whole tag, concept of its head noun or else of the whole tag)`; the head only with
        the fallback on."""
        concepts = self._tag_cache.get(tag)
        if concepts is None:
            key = _normalized(tag)
            exact = self._tag_index.get(key)
            head = exact
            if self._head_noun_fallback and " " in key:
                head_concept = self._tag_index.get(key.rsplit(" ", 1)[1])
                if head_concept is not None:
                    head = head_concept
            concepts = (exact, head)
            if len(self._tag_cache) < _TAG_CACHE_SIZE:
                self._tag_cache[tag] = concepts
        return concepts

    def _caption_spans(self, words: Sequence[str]) -> list[tuple[int, int, int, int, str]]:
        """Spans of `words` that name a concept, left to right, longest alias first, as
        `(start, end, concept, head concept or concept, normalised text)`."""
        keys = [_normalized(word) for word in words]
        caption_index, prefixes = self._caption_index, self._prefixes
        spans = []
        start, num_words = 0, len(keys)
        while start < num_words:
            key = keys[start]
            best_end, best_key = (start + 1, key) if key in caption_index else (0, "")
            end = start + 1
            while key in prefixes and end < num_words and keys[end]:
                key = f"{key} {keys[end]}"
                end += 1
                if key in caption_index:
                    best_end, best_key = end, key
            if best_end:
                concept = caption_index[best_key]
                head = concept
                if self._head_noun_fallback and " " in best_key:
                    head = caption_index.get(best_key.rsplit(" ", 1)[1], concept)
                spans.append((start, best_end, concept, head, best_key))
                start = best_end
            else:
                start += 1
        return spans

    # ----------------------------------------------------------------------------------------------------------
    # Building and serialising

    def extend(
        self,
        concepts: Mapping[str, Sequence[str]] | Sequence[str | tuple[str, Sequence[str]]],
        *,
        tag_aliases: Mapping[str, Sequence[str]] | None = None,
    ) -> ConceptLexicon:
        """A new lexicon with `concepts` appended; old ids are kept.

        A name that is already an alias adds its aliases to that concept instead of making a new one. An alias
        or tag alias that another concept already has (its name or any of its aliases) makes a kind, as in the
        constructor: `extend({"person": ["woman", "lady"]})` makes `woman` a kind of `person` (tags `person` then
        anchor the words "woman" and "lady", the pair labelled `person`); `extend({"dog": ["pup"]})` adds the
        word "pup" to `dog`. `extend({}, tag_aliases={"woman": ["person"]})` makes the same kind.
        """
        merged = [[name, list(aliases), list(tags)] for name, aliases, tags in self._entries()]
        new_entries = [(name, self._names_of_known(aliases)) for name, aliases in _concept_entries(concepts)]
        for name, aliases in new_entries:
            existing = self._caption_index.get(normalize_phrase(name))
            if existing is None:
                merged.append([name, list(aliases), []])
            else:
                merged[existing][1].extend((name, *aliases))
        names = [entry[0] for entry in merged]
        for name, tags in _tag_alias_entries(tag_aliases, [name for name, _ in new_entries] + names).items():
            existing = self._caption_index.get(normalize_phrase(name))
            merged[existing if existing is not None else names.index(name)][2].extend(self._names_of_known(tags))
        lexicon = ConceptLexicon.__new__(ConceptLexicon)
        lexicon._build([tuple(entry) for entry in merged], self._head_noun_fallback)
        return lexicon

    def _names_of_known(self, aliases: Sequence[object]) -> list[object]:
        """`aliases` with each caption alias of a concept of this lexicon replaced by that concept's name."""
        known = []
        for alias in aliases:
            concept = self._caption_index.get(normalize_phrase(alias)) if isinstance(alias, str) else None
            known.append(alias if concept is None else self._names[concept])
        return known

    def _entries(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        return list(zip(self._names, self._aliases, self._tag_aliases))

    def to_dict(self) -> dict:
        """JSON-serialisable form; `ConceptLexicon.from_dict` rebuilds the same lexicon."""
        return {
            "format": _LEXICON_FORMAT,
            "version": _LEXICON_VERSION,
            "head_noun_fallback": self._head_noun_fallback,
            "concepts": [
                {"name": name, "aliases": list(aliases), "tag_aliases": list(tag_aliases)}
                for name, aliases, tag_aliases in self._entries()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ConceptLexicon:
        """Inverse of `to_dict`."""
        if not isinstance(data, Mapping) or data.get("format") != _LEXICON_FORMAT:
            raise ValueError(f"data must be a dict written by ConceptLexicon.to_dict (format {_LEXICON_FORMAT!r}), "
                             f"got {_shorten(data)}")
        if data.get("version") != _LEXICON_VERSION:
            raise ValueError(f"lexicon version {_shorten(data.get('version'))} is not supported; "
                             f"expected {_LEXICON_VERSION}")
        concepts = data.get("concepts")
        if not isinstance(concepts, list) or not all(
            isinstance(entry, Mapping) and {"name", "aliases", "tag_aliases"} <= entry.keys() for entry in concepts
        ):
            raise ValueError(f"data['concepts'] must be a list of {{'name', 'aliases', 'tag_aliases'}} dicts, "
                             f"got {_shorten(concepts)}")
        return cls(
            [(entry["name"], entry["aliases"]) for entry in concepts],
            head_noun_fallback=data.get("head_noun_fallback", False),
            tag_aliases={entry["name"]: entry["tag_aliases"] for entry in concepts if entry["tag_aliases"]},
        )

    def save(self, path: str | Path) -> None:
        """Write the lexicon as a JSON file."""
        if not isinstance(path, (str, Path)):
            raise ValueError(f"path must be a str or Path to write the lexicon to, got {_shorten(path)}")
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ConceptLexicon:
        """Read a lexicon written by `save`."""
        if not isinstance(path, (str, Path)):
            raise ValueError(f"path must be a str or Path of a lexicon JSON file, got {_shorten(path)}")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"path {str(path)!r} cannot be read as a lexicon JSON file: {error}") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"path {str(path)!r} is not a JSON lexicon file: {error}") from error
        return cls.from_dict(data)

    @classmethod
    def default(cls, *, head_noun_fallback: bool = False) -> ConceptLexicon:
        """The COCO-80 + Visual Genome 1600 lexicon with the synonyms and kinds of `data/concept_synonyms.json`
        (`person` ⊃ man, woman, child, player, …; `dog` ⊃ puppy; `truck` ⊃ pickup truck; `animal` ⊃ the COCO
        animals; …).

        Built once per process and shared: a lexicon never changes after construction.
        """
        if not isinstance(head_noun_fallback, bool):
            raise ValueError(f"head_noun_fallback must be a bool, got {_shorten(head_noun_fallback)}")
        return _default_lexicon(head_noun_fallback)

    # ----------------------------------------------------------------------------------------------------------
    # Python protocol: immutable, so copies are the object itself; pickles as its dict form.

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptLexicon):
            return NotImplemented
        return self is other or (
            self._head_noun_fallback == other._head_noun_fallback
            and self._names == other._names
            and self._aliases == other._aliases
            and self._tag_aliases == other._tag_aliases
        )

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self._head_noun_fallback, self._names, self._aliases, self._tag_aliases))
        return self._hash

    def __copy__(self) -> ConceptLexicon:
        return self

    def __deepcopy__(self, memo: dict) -> ConceptLexicon:
        return self

    def __reduce__(self):
        return ConceptLexicon.from_dict, (self.to_dict(),)

    def __repr__(self) -> str:
        return f"ConceptLexicon({len(self)} concepts, head_noun_fallback={self._head_noun_fallback})"


_TAG_CACHE_SIZE = 1 << 16


def _alias_key(alias: object, name: str, argument: str) -> str:
    """The normalised alias of concept `name`, given in `argument`; checked to be a non-empty phrase."""
    if not isinstance(alias, str):
        raise ValueError(f"{argument}[{name!r}]: alias {_shorten(alias)} ({type(alias).__name__}) must be a str")
    key = normalize_phrase(alias)
    if not key:
        raise ValueError(f"{argument}[{name!r}]: alias {alias!r} normalises to nothing; expected a word or phrase")
    return key


def _transitive_kinds(broader: list[set[int]], names: Sequence[str]) -> dict[int, dict[int, int]]:
    """`{concept: {broader concept: steps}}` from each concept's direct broader concepts; a cycle is refused."""
    closure: dict[int, dict[int, int]] = {}
    for concept, direct in enumerate(broader):
        if not direct:
            continue
        steps = {parent: 1 for parent in direct}
        path_to = {parent: (concept, parent) for parent in direct}
        frontier = list(direct)
        while frontier:
            following = []
            for parent in frontier:
                for grandparent in broader[parent]:
                    if grandparent not in steps:
                        steps[grandparent] = steps[parent] + 1
                        path_to[grandparent] = (*path_to[parent], grandparent)
                        following.append(grandparent)
            frontier = following
        if concept in steps:
            cycle = " → ".join(repr(names[member]) for member in path_to[concept])
            raise ValueError(f"concepts and tag_aliases make concept {names[concept]!r} a kind of itself ({cycle}); "
                             "expected kinds without a cycle")
        closure[concept] = steps
    return closure


def _concept_entries(concepts: object) -> list[tuple[str, tuple[str, ...]]]:
    """`[(name, aliases)]` from the forms that `ConceptLexicon` accepts, validated."""
    expected = "a mapping {name: aliases} or a sequence of names and (name, aliases) pairs"
    if isinstance(concepts, Mapping):
        items = list(concepts.items())
    elif isinstance(concepts, Sequence) and not isinstance(concepts, (str, bytes)):
        items = []
        for position, item in enumerate(concepts):
            if isinstance(item, str):
                items.append((item, ()))
            elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
                items.append((item[0], item[1]))
            else:
                raise ValueError(f"concepts[{position}] must be a name or a (name, aliases) pair, "
                                 f"got {_shorten(item)}")
    else:
        raise ValueError(f"concepts must be {expected}, got {_shorten(concepts)}")
    entries = []
    for name, aliases in items:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"concept name {_shorten(name)} in concepts must be a non-empty str")
        if isinstance(aliases, (str, bytes)) or not isinstance(aliases, Sequence):
            raise ValueError(f"concepts[{name!r}] must be a sequence of str (its aliases), got {_shorten(aliases)}")
        entries.append((name, tuple(aliases)))
    return entries


def _tag_alias_entries(tag_aliases: object, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    if tag_aliases is None:
        return {}
    if not isinstance(tag_aliases, Mapping):
        raise ValueError(f"tag_aliases must be a mapping {{concept name: aliases}}, got {_shorten(tag_aliases)}")
    known = set(names)
    entries = {}
    for name, aliases in tag_aliases.items():
        if name not in known:
            raise ValueError(f"tag_aliases key {_shorten(name)} is not a concept name; expected one of the concepts' "
                             "names")
        if isinstance(aliases, (str, bytes)) or not isinstance(aliases, Sequence):
            raise ValueError(f"tag_aliases[{name!r}] must be a sequence of str (its tag aliases), "
                             f"got {_shorten(aliases)}")
        entries[name] = tuple(aliases)
    return entries


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@cache
def _default_lexicon(head_noun_fallback: bool) -> ConceptLexicon:
    """COCO classes first (in COCO order), then the Visual Genome classes, then synonym groups of neither.

    A class joins the synonym group that one of its names normalises into, or the concept of an earlier class
    with the same normal form ("men" → man); a class listed as a tag alias names its concept in tags only. Each
    word of a kinds entry that names a concept becomes a kind of the entry's concept, any other word its alias.
    """
    table = json.loads((_DATA_DIR / "concept_synonyms.json").read_text(encoding="utf-8"))
    group_name = {normalize_phrase(alias): group[0] for group in table["synonyms"] for alias in group}
    tag_only = {normalize_phrase(alias): name for name, aliases in table["tag_aliases"].items() for alias in aliases}
    concepts: dict[str, list[str]] = {}
    tag_aliases: dict[str, list[str]] = {}
    name_of_key: dict[str, str] = {}
    for class_name in (*COCO_CLASSES, *_read_lines(_DATA_DIR / "vg_objects_vocab.txt")):
        key = normalize_phrase(class_name)
        if key in tag_only:
            concepts.setdefault(tag_only[key], [])
            tag_aliases.setdefault(tag_only[key], []).append(class_name)
            continue
        name = group_name.get(key) or name_of_key.setdefault(key, class_name)
        concepts.setdefault(name, []).append(class_name)
    for group in table["synonyms"]:
        concepts.setdefault(group[0], []).extend(group[1:])
    for name, aliases in table["tag_aliases"].items():
        concepts.setdefault(name, [])
        tag_aliases.setdefault(name, []).extend(aliases)
    concept_of = {normalize_phrase(alias): name for name, aliases in concepts.items() for alias in (name, *aliases)}
    for broader, kinds in table["kinds"].items():
        concepts[concept_of[normalize_phrase(broader)]].extend(
            concept_of.get(normalize_phrase(kind), kind) for kind in kinds
        )
    return ConceptLexicon(concepts, head_noun_fallback=head_noun_fallback, tag_aliases=tag_aliases)


# --------------------------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorMatch:
    """One anchor pair: caption words `words[word_start:word_end]` and region `region_index` name `concept_id`."""

    word_start: int
    word_end: int
    region_index: int
    concept_id: int


def find_anchors(
    words: Sequence[str],
    tags: Sequence[str],
    lexicon: ConceptLexicon,
    scores: Sequence[float] | None = None,
) -> list[AnchorMatch]:
    """Pair caption words with detected regions that name the same concept, one-to-one.

    Words are grouped into the longest lexicon aliases, left to right (`"tennis racket"` is one span); each span
    is served in that order by the best free region of its concept: higher `scores` first, then lower index.
    A concept may be paired several times ("a cup next to a cup" and two cup regions: two anchors), but every
    word and every region is in at most one pair. Spans and regions left over are then paired by kind (see
    `ConceptLexicon`: "a woman" ↔ tag `person`, "an animal" ↔ tag `dog`), each span taking the free region of
    the nearest related concept (then score, then index); the pair carries the broader concept's id, the one
    both sides name. With `lexicon.head_noun_fallback`, what is still left is paired the same way as the exact
    pairs by head concept (`racket` ↔ `tennis racket`), the pair carrying the head's id.

    Args:
        words: the caption's words, e.g. from the tokenizer's word ids or `split_words`; each is normalised.
        tags: the detector's class name of every region.
        lexicon: the concepts to look for.
        scores: optional detector confidence of every region (finite numbers, one per tag).

    Returns:
        The pairs sorted by `word_start`; `[]` when there are no words or no tags.
    """
    words = _checked_strings(words, "words")
    tags = _checked_strings(tags, "tags")
    if not isinstance(lexicon, ConceptLexicon):
        raise ValueError(f"lexicon must be a ConceptLexicon, got {_shorten(lexicon)} ({type(lexicon).__name__})")
    scores = _checked_scores(scores, len(tags))
    return _pair(words, tags, lexicon, scores)[1]


def _pair(
    words: list[str], tags: list[str], lexicon: ConceptLexicon, scores: list[float] | None
) -> tuple[list[tuple[int, int, int, int, str]], list[AnchorMatch]]:
    """`(concept spans of the caption, anchors)` for validated arguments."""
    if not words:
        return [], []
    spans = lexicon._caption_spans(words)
    if not spans or not tags:
        return spans, []
    region_concepts = [lexicon._tag_concepts(tag) for tag in tags]
    anchors, unpaired_spans, used_regions = _pair_spans(spans, region_concepts, 2, 0, scores, set())
    if lexicon._related and unpaired_spans and len(used_regions) < len(tags):
        kind_anchors, unpaired_spans, used_regions = _pair_kinds(
            unpaired_spans, region_concepts, lexicon._related, scores, used_regions
        )
        anchors.extend(kind_anchors)
    if lexicon.head_noun_fallback and unpaired_spans and len(used_regions) < len(tags):
        head_anchors, _, _ = _pair_spans(unpaired_spans, region_concepts, 3, 1, scores, used_regions)
        anchors.extend(head_anchors)
    if len(anchors) > 1:
        anchors.sort(key=lambda anchor: anchor.word_start)
    return spans, anchors


def _free_regions(
    region_concepts: list[tuple[int | None, int | None]],
    region_field: int,
    wanted,
    scores: list[float] | None,
    used_regions: set[int],
) -> dict[int, list[int]]:
    """The regions not in `used_regions` whose concept (`region_concepts[i][region_field]`) is in `wanted`, by
    concept, each list best first: higher score, then lower index."""
    free_regions: dict[int, list[int]] = {}
    for index, concepts in enumerate(region_concepts):
        concept = concepts[region_field]
        if concept in wanted and index not in used_regions:
            free_regions.setdefault(concept, []).append(index)
    if scores is not None:
        for candidates in free_regions.values():
            if len(candidates) > 1:
                candidates.sort(key=lambda index: (-scores[index], index))
    return free_regions


def _pair_kinds(
    spans: list[tuple[int, int, int, int, str]],
    region_concepts: list[tuple[int | None, int | None]],
    related: dict[int, dict[int, tuple[int, int]]],
    scores: list[float] | None,
    used_regions: set[int],
) -> tuple[list[AnchorMatch], list[tuple[int, int, int, int, str]], set[int]]:
    """Serve `spans` in order with free regions whose concept is broader or narrower than the span's, nearest
    first: `(anchors carrying the broader concept, spans left over, regions used)`."""
    free_regions = _free_regions(region_concepts, 0, related, scores, used_regions)
    anchors, unpaired = [], []
    used = set(used_regions)
    for span in spans:
        kinds = related.get(span[2])
        best = None
        if kinds:
            for concept, candidates in free_regions.items():
                if candidates and concept in kinds:
                    region = candidates[0]
                    rank = (kinds[concept][0], -scores[region] if scores is not None else 0.0, region)
                    if best is None or rank < best[0]:
                        best = (rank, concept)
        if best is None:
            unpaired.append(span)
        else:
            region = free_regions[best[1]].pop(0)
            used.add(region)
            anchors.append(AnchorMatch(span[0], span[1], region, related[span[2]][best[1]][1]))
    return anchors, unpaired, used


def _pair_spans(
    spans: list[tuple[int, int, int, int, str]],
    region_concepts: list[tuple[int | None, int | None]],
    span_field: int,
    region_field: int,
    scores: list[float] | None,
    used_regions: set[int],
) -> tuple[list[AnchorMatch], list[tuple[int, int, int, int, str]], set[int]]:
    """Serve `spans` in order with free regions of the same concept (`span[span_field]` and
    `region_concepts[i][region_field]`): `(anchors, spans left over, regions used)`."""
    free_regions = _free_regions(region_concepts, region_field, {span[span_field] for span in spans}, scores,
                                 used_regions)
    anchors, unpaired = [], []
    used = set(used_regions)
    for span in spans:
        candidates = free_regions.get(span[span_field])
        if candidates:
            region = candidates.pop(0)
            used.add(region)
            anchors.append(AnchorMatch(span[0], span[1], region, span[span_field]))
        else:
            unpaired.append(span)
    return anchors, unpaired, used


def _checked_strings(values: object, argument: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{argument} must be a sequence of str, got {_shorten(values)} ({type(values).__name__})")
    values = list(values)
    if not all(isinstance(value, str) for value in values):
        position, value = next((i, v) for i, v in enumerate(values) if not isinstance(v, str))
        raise ValueError(f"{argument}[{position}] must be a str, got {_shorten(value)} ({type(value).__name__})")
    return values


def _checked_scores(scores: object, num_tags: int) -> list[float] | None:
    if scores is None:
        return None
    if hasattr(scores, "tolist"):  # numpy arrays and torch tensors
        scores = scores.tolist()
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise ValueError(f"scores must be a sequence of finite numbers, got {_shorten(scores)}")
    scores = list(scores)
    if len(scores) != num_tags:
        raise ValueError(f"scores must have one number per tag ({num_tags}), got {len(scores)}: {_shorten(scores)}")
    for position, score in enumerate(scores):
        # The exact-type test first: the `numbers.Real` check is slow and scores come per caption.
        if not (type(score) in (float, int) or (isinstance(score, numbers.Real) and not isinstance(score, bool))):
            raise ValueError(f"scores[{position}] must be a finite number, got {_shorten(score)}")
        if not math.isfinite(score):
            raise ValueError(f"scores[{position}] must be a finite number, got {_shorten(score)}")
    return [float(score) for score in scores]


# --------------------------------------------------------------------------------------------------------------
# Corpus statistics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AnchorStatistics:
    """How often captions of a corpus find anchors, and what is missed most.

    `top_unmatched_tags`: tags of regions that got no word (most frequent first); `top_unmatched_words`: caption
    phrases that are lexicon aliases but found no region (normalised), the misses worth a look.
    """

    num_captions: int
    captions_with_anchor: int
    num_anchors: int
    share_with_anchor: float
    anchors_per_caption: float
    top_unmatched_tags: list[tuple[str, int]]
    top_unmatched_words: list[tuple[str, int]]

    def format(self) -> str:
        """A human-readable summary, several lines."""
        lines = [
            (
                f"captions: {self.num_captions:,}, with at least one anchor: {self.captions_with_anchor:,} "
                f"({self.share_with_anchor:.1%})"
            ),
            f"anchors: {self.num_anchors:,} ({self.anchors_per_caption:.2f} per caption)",
        ]
        for title, counts in (
            ("tags that matched no word", self.top_unmatched_tags),
            ("lexicon words that matched no region", self.top_unmatched_words),
        ):
            listed = ", ".join(f"{text} ({count:,})" for text, count in counts) or "none"
            lines.append(f"{title}: {listed}")
        return "\n".join(lines)


_END = object()


def anchor_statistics(
    captions: Iterable[str],
    tags: Iterable[Sequence[str]],
    lexicon: ConceptLexicon | None = None,
    *,
    top_k: int = 20,
) -> AnchorStatistics:
    """Anchor statistics of captions (split with `split_words`) paired with the tags of their image's regions.

    Args:
        captions: one text per row; tags: the region tags of each row (same number of rows).
        lexicon: the lexicon to match with (default: `ConceptLexicon.default()`).
        top_k: how many unmatched tags and words to report.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {_shorten(top_k)}")
    if lexicon is None:
        lexicon = ConceptLexicon.default()
    elif not isinstance(lexicon, ConceptLexicon):
        raise ValueError(f"lexicon must be a ConceptLexicon or None, got {_shorten(lexicon)}")
    num_captions = captions_with_anchor = num_anchors = 0
    unmatched_tags: Counter[str] = Counter()
    unmatched_words: Counter[str] = Counter()
    tag_rows = iter(tags)
    for caption in captions:
        row_tags = next(tag_rows, _END)
        if row_tags is _END:
            raise ValueError(f"tags has fewer rows than captions ({num_captions}); expected one row per caption")
        if not isinstance(caption, str):
            raise ValueError(f"captions[{num_captions}] must be a str, got {_shorten(caption)}")
        try:
            spans, anchors = _pair(split_words(caption), _checked_strings(row_tags, "tags"), lexicon, None)
        except ValueError as error:
            raise ValueError(f"row {num_captions}: {error}") from error
        num_captions += 1
        num_anchors += len(anchors)
        captions_with_anchor += bool(anchors)
        paired_regions = {anchor.region_index for anchor in anchors}
        paired_starts = {anchor.word_start for anchor in anchors}
        unmatched_tags.update(tag.strip() for index, tag in enumerate(row_tags) if index not in paired_regions)
        unmatched_words.update(span[4] for span in spans if span[0] not in paired_starts)
    if next(tag_rows, _END) is not _END:
        raise ValueError(f"tags has more rows than captions ({num_captions}); expected one row per caption")
    return AnchorStatistics(
        num_captions=num_captions,
        captions_with_anchor=captions_with_anchor,
        num_anchors=num_anchors,
        share_with_anchor=captions_with_anchor / num_captions if num_captions else 0.0,
        anchors_per_caption=num_anchors / num_captions if num_captions else 0.0,
        top_unmatched_tags=unmatched_tags.most_common(top_k),
        top_unmatched_words=unmatched_words.most_common(top_k),
    )
