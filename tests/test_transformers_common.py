"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run against CmalModel and every head.

The mixins come from `tests/` of the transformers source distribution matching the installed version: fetched once
with `pip download --no-binary :all: --no-deps transformers==<version>` and extracted into a cache folder
(`~/.cache/cmal/transformers-<version>-tests`, or the folder `CMAL_TRANSFORMERS_TESTS` names). Without a network the
module is skipped. The sdist's tests/ is a package named `tests`, as the project's own tests folder is called, so it
is imported under a name of its own (`transformers_sdist_tests`) and nothing goes onto `sys.path`.

The sdist ships `test_modeling_common.py` and `test_configuration_common.py` but not the sibling packages they
import from (`exporters/`, `generation/`, `utils/`); where those are missing the cache gets small stand-ins
(`_STAND_INS`): an empty `ExportTesterMixin` (torch.export of the trunk is tested in test_compile.py), an empty
`GenerationTesterMixin` (CMAL does not generate) and the common config arguments `ConfigTester` sets. A full
`tests/` checkout of the transformers repository named by `CMAL_TRANSFORMERS_TESTS` is used as it is.

Three test classes, because the mixins count outputs per class: the trunk (whose hidden states and attentions come
for three encoders), the single-image heads, and NLVR2's head (an image axis in its visual inputs).
"""

import importlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
import warnings
from unittest import mock

import pytest
import torch
import transformers
from test_common import head_inputs
from test_model_core import B, M, N, make_config
from transformers.models.auto import modeling_auto

from modeling_cmal import (
    CmalConfig,
    CmalForImageTextMatching,
    CmalForPreTraining,
    CmalForQuestionAnswering,
    CmalForReferringExpression,
    CmalForVisualEntailment,
    CmalForVisualReasoning,
    CmalModel,
)

pytest.importorskip("parameterized", reason="transformers' common model tests import `parameterized` (a test extra)")

TESTS_PACKAGE = "transformers_sdist_tests"
TESTS_FOLDER_VARIABLE = "CMAL_TRANSFORMERS_TESTS"
REQUIRED_FILES = ("__init__.py", "test_modeling_common.py", "test_configuration_common.py")

# Arguments of every `PreTrainedConfig`, each away from its default: `ConfigTester.check_config_arguments_init`
# checks that the model's config passes them through.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["CmalModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
_STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": f"config_common_kwargs = {CONFIG_COMMON_KWARGS!r}\n",
}


def _tests_folder() -> pathlib.Path:
    folder = os.environ.get(TESTS_FOLDER_VARIABLE)
    if folder:
        return pathlib.Path(folder).expanduser()
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "cmal"
    return cache / f"transformers-{transformers.__version__}-tests"


def _download_tests(folder: pathlib.Path) -> None:
    """Extracts `tests/` of the sdist (without `models/`) into `folder`, atomically: into a temporary folder beside
    it, renamed once complete, so that an interrupted or concurrent run never leaves half a folder behind."""
    version = transformers.__version__
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as work:
        work = pathlib.Path(work)
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                   f"transformers=={version}", "-d", str(work / "sdist")]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download of the transformers {version} sdist timed out", allow_module_level=True)
        archives = sorted((work / "sdist").glob(f"transformers-{version}.tar.gz"))
        if result.returncode != 0 or not archives:
            reason = (result.stderr.strip().splitlines() or ["no archive"])[-1]
            pytest.skip(f"cannot fetch the transformers {version} sdist for its common tests: {reason}",
                        allow_module_level=True)
        prefix = f"transformers-{version}/tests/"
        extracted = work / "tests"
        with tarfile.open(archives[0]) as archive:
            members = []
            for member in archive.getmembers():
                relative = member.name[len(prefix):]
                if member.name.startswith(prefix) and relative and not relative.startswith("models/"):
                    member.name = relative
                    members.append(member)
            archive.extractall(extracted, members=members, filter="data")
        for relative, text in {"__init__.py": "", **_STAND_INS}.items():
            target = extracted / relative
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
        try:
            extracted.rename(folder)
        except OSError:  # another run got there first
            if not all((folder / name).exists() for name in REQUIRED_FILES):
                raise


def _import_transformers_tests():
    folder = _tests_folder()
    if not all((folder / name).exists() for name in REQUIRED_FILES):
        if folder.exists() and os.environ.get(TESTS_FOLDER_VARIABLE):
            raise FileNotFoundError(f"{TESTS_FOLDER_VARIABLE}={folder} must hold {', '.join(REQUIRED_FILES)} of "
                                    f"the tests/ folder of transformers {transformers.__version__}")
        shutil.rmtree(folder, ignore_errors=True)
        _download_tests(folder)
    if TESTS_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(TESTS_PACKAGE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[TESTS_PACKAGE] = package
        spec.loader.exec_module(package)
    with warnings.catch_warnings():  # the marks transformers registers in its own conftest.py
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return (importlib.import_module(f"{TESTS_PACKAGE}.test_modeling_common"),
                importlib.import_module(f"{TESTS_PACKAGE}.test_configuration_common"))


test_modeling_common, test_configuration_common = _import_transformers_tests()
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester

LABEL_KEYS = ("labels", "itm_labels")
NUM_LABELS = 4


class CmalModelTester:
    """Tiny sizes (hidden 32; 1 text, 1 region and 2 unified layers) and the inputs of test_common / test_model_core:
    `B` pairs of `N` word pieces and `M` regions, with anchors of every action."""

    def __init__(self, parent, model_class=CmalModel, is_training=True, num_hidden_states_types=1):
        self.parent = parent
        self.model_class = model_class
        self.is_training = is_training
        self.batch_size = B
        self.seq_length = N
        # The mixins read the unified encoder's outputs (`hidden_states`, `attentions`) over `[CLS] text [SEP] regions`.
        self.encoder_seq_length = N + M
        self.num_labels = NUM_LABELS
        config = self.get_config()
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.num_hidden_layers = config.num_unified_layers
        self.vocab_size = config.vocab_size
        # How many `*_hidden_states` fields `output_hidden_states=True` adds to the output.
        self.num_hidden_states_types = num_hidden_states_types

    def get_config(self) -> CmalConfig:
        return make_config(num_labels=self.num_labels)

    def prepare_config_and_inputs_for_common(self):
        inputs = head_inputs(self.model_class)
        return self.get_config(), {key: value for key, value in inputs.items() if key not in LABEL_KEYS}

    def labels(self, model_class) -> dict:
        """Targets for `model_class`, shaped by its docstring."""
        if model_class is CmalForQuestionAnswering:  # VQA soft scores
            # Seeded: the equivalence tests build the inputs twice and compare the two outputs.
            generator = torch.Generator().manual_seed(0)
            return {"labels": torch.rand(self.batch_size, self.num_labels, generator=generator).round()}
        return {key: value for key, value in head_inputs(model_class).items() if key in LABEL_KEYS}


class CmalTesterMixin(ModelTesterMixin):
    """What the three test classes share: labels for every head, and the heads registered under transformers'
    sequence-classification Auto class treated as transformers treats its own (`test_problem_types`)."""

    model_tester_kwargs = {}
    # What `test_eager_matches_sdpa_inference` passes beside `input_ids` and `attention_mask`: a model of image-text
    # pairs needs its regions.
    additional_model_inputs = ["visual_feats", "visual_pos"]

    # transformers' tests know its models by the Auto mappings: the trunk (no loss: no training tests) and the
    # sequence-classification heads (labels and `problem_type`). CMAL classes registered there are added for the
    # duration of the tests.
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for auto_class, names in ((transformers.AutoModel, modeling_auto.MODEL_MAPPING_NAMES),
                                  (transformers.AutoModelForSequenceClassification,
                                   modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)):
            registered = auto_class._model_mapping._extra_content.get(CmalConfig)
            if registered is not None:
                cls.enterClassContext(mock.patch.dict(names, {CmalConfig.model_type: registered.__name__}))

    def setUp(self):
        self.model_tester = CmalModelTester(self, model_class=self.all_model_classes[0], **self.model_tester_kwargs)
        self.config_tester = ConfigTester(self, config_class=CmalConfig, hidden_size=64, num_attention_heads=4,
                                          intermediate_size=37)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is not CmalModel:
            inputs_dict = {**self.model_tester.labels(model_class), **inputs_dict}
        return inputs_dict

    @unittest.skip(reason="calls the trunk with input_ids alone, as for a text model; CMAL needs visual_feats and "
                          "visual_pos (the loading part is test_can_load_ignoring_mismatched_shapes)")
    def test_load_with_mismatched_shapes(self):
        pass


class CmalModelTest(CmalTesterMixin, unittest.TestCase):
    all_model_classes = (CmalModel,)
    model_tester_kwargs = {"num_hidden_states_types": 3}  # text_, vision_ and (unified) hidden_states

    def test_config(self):
        self.config_tester.run_common_tests()


class CmalHeadsTest(CmalTesterMixin, unittest.TestCase):
    all_model_classes = (CmalForPreTraining, CmalForQuestionAnswering, CmalForVisualEntailment,
                         CmalForReferringExpression, CmalForImageTextMatching)


class CmalForVisualReasoningTest(CmalTesterMixin, unittest.TestCase):
    all_model_classes = (CmalForVisualReasoning,)
