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

from modeling_cmal import CmalConfig

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


# ----------------------------------------------------------------------------------------------------------------
# A clone that tests itself
# ----------------------------------------------------------------------------------------------------------------


def test_tests_carry_their_own_data(shared_data_dir):
    assert shared_data_dir == TESTS_DIR / "data"
    seeds = json.loads((shared_data_dir / "real_image_seeds.json").read_text())
    assert {"astronaut", "chelsea", "coffee"} <= set(seeds["images"])
    vocab = shared_data_dir / "vg_objects_vocab.txt"
    # one copy of the Visual Genome list: the test data links to the one the package ships
    assert vocab.resolve() == (REPO_ROOT / "modeling_cmal" / "data" / "vg_objects_vocab.txt").resolve()
    assert len(vocab.read_text().splitlines()) == 1600


def test_no_test_reads_the_shared_folder_beside_the_repository():
    pattern = re.compile(r"""(\.\./shared|["']shared["']|SHARED_DIR)""")
    offenders = [f"{path.name}:{number}" for path in sorted(TESTS_DIR.glob("*.py")) if path.name != Path(__file__).name
                 for number, line in enumerate(path.read_text().splitlines(), start=1) if pattern.search(line)]
    assert offenders == []
