"""A corpus's own word-piece vocabulary: the pieces of a base tokenizer that the corpus's texts use.

A small world (the synthetic scenes use about a hundred words) pays for the whole 30,522-piece bert-base-uncased
vocabulary in every pre-training step: the word-embedding gradient and its AdamW update, tied to the MLM decoder,
were half of the main job's model step (203 ms against 108 ms with 1,000 pieces, hidden 128). `subset_tokenizer`
keeps only the pieces the texts need. WordPiece matches the longest piece first, and every piece the base tokenizer
picks for these texts is kept, so the texts tokenize to the same pieces (tested); a word outside the texts may split
differently or become `[UNK]`.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import BertTokenizer


def subset_tokenizer(texts: Iterable[str], base: BertTokenizer | None = None) -> BertTokenizer:
    """A `BertTokenizer` holding the special tokens of `base` (default: the bundled bert-base-uncased tokenizer) and
    the pieces `base` gives `texts`, in `base`'s order; same lower-casing and `model_max_length`."""
    if base is None:
        from modeling_cmal.processing_cmal import default_tokenizer

        base = default_tokenizer()
    used = set(base.all_special_tokens)
    count = 0
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"texts must hold str, got {type(text).__name__} at position {count}")
        used.update(base.tokenize(text))
        count += 1
    if count == 0:
        raise ValueError("texts is empty; expected the corpus's captions, questions and statements")
    pieces = [piece for piece, _ in sorted(base.get_vocab().items(), key=lambda item: item[1]) if piece in used]
    return BertTokenizer(vocab={piece: index for index, piece in enumerate(pieces)},
                         do_lower_case=getattr(base, "do_lower_case", True),
                         model_max_length=base.model_max_length)
