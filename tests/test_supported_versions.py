"""The package against the transformers a user has: public names only, folders of earlier versions, and folders that
cross between the oldest declared and the newest transformers through remote code.

- `test_runtime_files_use_no_private_transformers_name`: every private (underscore) name of transformers that the
  runtime files import, call with, or override is listed in `ALLOWED_PRIVATE_NAMES` with the reason no public route
  exists; a new one fails here. transformers renames its private names between minor releases (5.25 stopped calling
  `ProcessorMixin._get_arguments_from_pretrained`, which broke every processor folder).
- `test_a_folder_saved_with_transformers_5_24_loads`: `tests/data/saved_with_transformers_5_24` was written by
  `CmalProcessor.save_pretrained` and `CmalForQuestionAnswering.save_pretrained` under transformers 5.24 (its
  `expected_outputs.json` holds the inputs and logits it gave then); it loads and gives the same logits.
- `test_remote_code_crosses_between_two_environments`: with `CMAL_OTHER_PYTHON` naming the Python of a second
  environment (`.ci/run` sets it to the other version leg's), a folder saved here loads there with
  `trust_remote_code=True` where `modeling_cmal` cannot be imported, and the other way round, with the same outputs.
  Skipped without the variable (docs/supported_versions.md says how to run it locally).

The tests marked `smoke` here and in the other files are the set that `.ci/run` runs on the oldest declared versions.
"""

import ast
import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO_ROOT
from transformers import AutoProcessor

import modeling_cmal
from modeling_cmal import (
    CmalConfig,
    CmalForPreTraining,
    CmalForQuestionAnswering,
    CmalProcessor,
    CmalRegionProcessor,
    upgrade_checkpoint_folder,
)

RUNTIME_FILES = sorted((REPO_ROOT / "modeling_cmal").glob("*.py"))
SAVED_5_24 = pathlib.Path(__file__).parent / "data" / "saved_with_transformers_5_24"
OTHER_PYTHON = "CMAL_OTHER_PYTHON"

# Private names of transformers that the runtime files use, each with why no public route exists. Extension points
# that transformers documents for subclasses are public in this sense, though their names begin with "_".
ALLOWED_PRIVATE_NAMES = {
    # PreTrainedModel: the attributes and hook every model file of transformers defines (the "add a model" guide).
    "_init_weights": "PreTrainedModel's documented weight-initialisation hook",
    "_no_split_modules": "read by FSDP wrapping and device_map; set by every transformers model",
    "_supports_sdpa": "declares the sdpa attention backend, as every transformers model does",
    "_supports_attention_backend": "declares the attention-interface backends, as every transformers model does",
    "_can_record_outputs": "what capture_outputs records (hidden states, attentions), as in the BERT model file",
    # Pipeline: the documented hooks of a custom pipeline ("Adding a new pipeline").
    "_sanitize_parameters": "Pipeline's documented hook splitting call arguments between the steps",
    "_forward": "Pipeline's documented model step",
    "_load_processor": "tells pipeline() which preprocessors a custom pipeline needs; no public setting exists",
    "_load_tokenizer": "as _load_processor",
    "_load_image_processor": "as _load_processor",
    "_load_feature_extractor": "as _load_processor",
    "_load_video_processor": "as _load_processor",
}


def _defined_names(class_node: ast.ClassDef) -> set[str]:
    names = set()
    for node in class_node.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def importlib_module(path: pathlib.Path):
    """The imported module of a runtime file (the probe test replaces this)."""
    return importlib.import_module(f"modeling_cmal.{path.stem}") if path.stem != "__init__" else modeling_cmal


def private_transformers_names() -> dict[str, set[str]]:
    """`{name: {where, ...}}` of every private transformers name the runtime files import, pass as a keyword
    argument, or define in a class that inherits it from a transformers class."""
    found: dict[str, set[str]] = {}

    def add(name: str, where: str) -> None:
        found.setdefault(name, set()).add(where)

    for path in RUNTIME_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = importlib_module(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("transformers"):
                for part in node.module.split("."):
                    if part.startswith("_"):
                        add(node.module, f"{path.name}: import from {node.module}")
                for alias in node.names:
                    if alias.name.startswith("_"):
                        add(alias.name, f"{path.name}: import from {node.module}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id == "transformers":
                add(node.attr, f"{path.name}: transformers.{node.attr}")
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg and keyword.arg.startswith("_"):
                        add(keyword.arg, f"{path.name}: keyword argument")
            elif isinstance(node, ast.ClassDef):
                runtime_class = getattr(module, node.name, None)
                if not inspect.isclass(runtime_class):
                    continue
                bases = [base for base in runtime_class.__mro__[1:] if base.__module__.startswith("transformers")]
                for name in _defined_names(node):
                    if name.startswith("_") and not name.startswith("__") and any(name in vars(b) for b in bases):
                        add(name, f"{path.name}: {node.name} overrides it")
    return found


@pytest.mark.smoke
def test_runtime_files_use_no_private_transformers_name():
    found = private_transformers_names()
    new = {name: sorted(where) for name, where in found.items() if name not in ALLOWED_PRIVATE_NAMES}
    assert not new, ("the runtime files use private transformers names (use a documented API, or add the name to "
                     f"ALLOWED_PRIVATE_NAMES with why no public route exists): {new}")
    # The scan sees what it must: the documented hooks the model and pipeline files do override.
    assert {"_init_weights", "_sanitize_parameters", "_forward"} <= set(found)


def test_the_private_name_scan_catches_imports_keywords_and_overrides(tmp_path, monkeypatch):
    source = textwrap.dedent("""
        from transformers.core_model_loading import _IdentityOp
        from transformers import ProcessorMixin
        from transformers.utils import cached_file
        path = cached_file("x", "y", _raise_exceptions_for_missing_entries=False)

        class ScanProbeProcessor(ProcessorMixin):
            @classmethod
            def _load_tokenizer_from_pretrained(cls, *args, **kwargs):
                return []
    """)
    probe = tmp_path / "scan_probe.py"
    probe.write_text(source)
    namespace = {"__name__": "scan_probe"}
    exec(compile(source.replace("path = cached_file", "path = None and cached_file"), str(probe), "exec"), namespace)
    monkeypatch.setattr(sys.modules[__name__], "RUNTIME_FILES", [probe])
    monkeypatch.setattr(sys.modules[__name__], "importlib_module", lambda path: type("M", (), namespace))
    found = private_transformers_names()
    assert {"_IdentityOp", "_raise_exceptions_for_missing_entries", "_load_tokenizer_from_pretrained"} <= set(found)


def _expected_5_24() -> dict:
    return json.loads((SAVED_5_24 / "expected_outputs.json").read_text())


@pytest.mark.smoke
@pytest.mark.parametrize("load", [CmalProcessor.from_pretrained, AutoProcessor.from_pretrained])
def test_a_folder_saved_with_transformers_5_24_loads(load):
    expected = _expected_5_24()
    assert expected["transformers"] == "5.24.0"
    processor = load(SAVED_5_24)
    assert isinstance(processor, CmalProcessor) and isinstance(processor.image_processor, CmalRegionProcessor)
    assert processor.max_regions == 4 and processor.tag_vocabulary == ["circle", "square", "triangle"]
    inputs = processor(text=[expected["text"]], regions=[expected["regions"]], return_tensors="pt")
    assert {name: value.tolist() for name, value in inputs.items()} == expected["inputs"]
    model = CmalForQuestionAnswering.from_pretrained(SAVED_5_24).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, torch.tensor(expected["logits"]))


@pytest.mark.smoke
def test_a_processor_folder_saves_its_region_processor_for_auto_image_processor(tmp_path):
    processor = CmalProcessor.from_pretrained(SAVED_5_24)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    assert saved["image_processor_type"] == "CmalRegionProcessor"
    assert saved["auto_map"]["AutoImageProcessor"] == "region_processing_cmal.CmalRegionProcessor"
    image_processor = transformers.models.auto.image_processing_auto.AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(image_processor, CmalRegionProcessor) and image_processor.max_regions == 4
    reloaded = CmalProcessor.from_pretrained(tmp_path, max_regions=2)
    assert reloaded.max_regions == 2 and reloaded.tag_vocabulary == processor.tag_vocabulary


def test_a_checkpoint_with_zero_dim_scalars_is_upgraded_explicitly(tmp_path):
    from safetensors.torch import load_file, save_file

    config = CmalConfig(vocab_size=30, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        num_text_layers=1, num_visual_layers=1, num_unified_layers=1, visual_feat_dim=6,
                        num_anchor_concepts=10)
    model = CmalForPreTraining(config)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    scalars = sorted(key for key, tensor in weights.items() if key.endswith(("hypersphere.scale", "logit_scale")))
    assert len(scalars) == 3
    # The layout before 2026-12-02: 0-dim scalars.
    save_file({key: tensor.reshape(()) if key in scalars else tensor for key, tensor in weights.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="mismatch"):
        CmalForPreTraining.from_pretrained(tmp_path)
    command = [sys.executable, "-m", "modeling_cmal.convert_cmal_checkpoint", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
    assert all(key in completed.stdout for key in scalars)
    reloaded = CmalForPreTraining.from_pretrained(tmp_path)
    for key in scalars:
        torch.testing.assert_close(reloaded.state_dict()[key], weights[key])
    assert upgrade_checkpoint_folder(tmp_path) == []
    with pytest.raises(ValueError, match=r"has no model.safetensors"):
        upgrade_checkpoint_folder(tmp_path / "missing")


def test_the_checkpoint_converter_reads_its_folders_with_hf_argument_parser(tmp_path, capsys):
    """`python -m modeling_cmal.convert_cmal_checkpoint FOLDER [FOLDER ...]` (or `--folders ...`): a dataclass read by
    `HfArgumentParser`; no folder, an unknown flag or a folder without weights stops before any rewrite with exit
    status 2 and names it."""
    from modeling_cmal.convert_cmal_checkpoint import parse_args

    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
    assert parse_args([str(first)]).folders == [str(first)]
    assert parse_args([str(first), str(second)]).folders == [str(first), str(second)]
    assert parse_args(["--folders", str(first), str(second)]).folders == [str(first), str(second)]
    for argv, message in (([], "the following arguments are required: FOLDER"),
                          (["--dry-run", str(first)], "unrecognized arguments: --dry-run"),
                          ([str(first), str(tmp_path / "missing")],
                           f"folder {str(tmp_path / 'missing')!r} has no model.safetensors")):
        with pytest.raises(SystemExit) as exited:
            parse_args(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Remote code across two environments
# ----------------------------------------------------------------------------------------------------------------

# Saves a tiny VQA folder (model + processor) under this process's transformers, with its inputs and logits.
SAVE_SCRIPT = """
import json, sys
import numpy as np, torch, transformers
from transformers import BertTokenizer
from modeling_cmal import CmalConfig, CmalForQuestionAnswering, CmalProcessor
folder = sys.argv[1]
words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "what", "color",
         "is", "the", "?"]
tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)}, model_max_length=16)
processor = CmalProcessor(tokenizer=tokenizer, max_regions=3, tag_vocabulary=["circle", "square"])
torch.manual_seed(0)
config = CmalConfig(vocab_size=len(words), hidden_size=32, num_attention_heads=2, intermediate_size=64,
                    num_text_layers=1, num_visual_layers=1, num_unified_layers=1, visual_feat_dim=4,
                    max_position_embeddings=16, num_anchor_concepts=len(processor.lexicon),
                    id2label={0: "red", 1: "blue"}, label2id={"red": 0, "blue": 1})
model = CmalForQuestionAnswering(config).eval()
model.save_pretrained(folder)
processor.save_pretrained(folder)
regions = {"visual_feats": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4).tolist(),
           "visual_pos": [[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8]], "tags": [0, 1], "scores": [0.9, 0.8]}
inputs = processor(text=["what color is the circle ?"], regions=[regions], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
json.dump({"transformers": transformers.__version__, "text": "what color is the circle ?", "regions": regions,
           "logits": logits.tolist()},
          open(folder + "/expected.json", "w"))
"""

# Loads that folder with remote code where modeling_cmal cannot be imported; prints its logits and the version.
LOAD_SCRIPT = """
import json, sys
sys.modules["modeling_cmal"] = None
try:
    import modeling_cmal
    raise SystemExit("modeling_cmal must not be importable here")
except ImportError:
    pass
import torch, transformers
from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor
folder = sys.argv[1]
expected = json.load(open(folder + "/expected.json"))
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForVisualQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
inputs = processor(text=[expected["text"]], regions=[expected["regions"]], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({"transformers": transformers.__version__, "logits": logits.tolist()}))
"""


def _run(python: str, script: str, folder: pathlib.Path) -> str:
    completed = subprocess.run([python, "-c", script, str(folder)], capture_output=True, text=True, timeout=600,
                               cwd=folder.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, f"{python}: {completed.stderr[-3000:]}"
    return completed.stdout


def _versions(python: str) -> str:
    return subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.smoke
@pytest.mark.parametrize("direction", ["saved_here_loaded_there", "saved_there_loaded_here"])
def test_remote_code_crosses_between_two_environments(direction, tmp_path):
    other = os.environ.get(OTHER_PYTHON)
    if not other:
        pytest.skip(f"{OTHER_PYTHON} names no second environment (.ci/run sets it; see docs/supported_versions.md)")
    here = sys.executable
    saver, loader = (here, other) if direction == "saved_here_loaded_there" else (other, here)
    folder = tmp_path / "vqa"
    _run(saver, SAVE_SCRIPT, folder)
    expected = json.loads((folder / "expected.json").read_text())
    loaded = json.loads(_run(loader, LOAD_SCRIPT, folder).strip().splitlines()[-1])
    assert expected["transformers"] == _versions(saver) and loaded["transformers"] == _versions(loader)
    np.testing.assert_allclose(loaded["logits"], expected["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.smoke
def test_a_folder_saved_with_transformers_5_24_written_anew_loads_with_remote_code(tmp_path):
    """The documented way for an old folder to run as remote code: `cmal-hub-export` writes it with today's code."""
    from cmal_examples.hub_export import export as hub_export

    folder = hub_export(["--model", str(SAVED_5_24), "--output", str(tmp_path / "vqa")])
    (folder / "expected.json").write_text((SAVED_5_24 / "expected_outputs.json").read_text())
    loaded = json.loads(_run(sys.executable, LOAD_SCRIPT, folder).strip().splitlines()[-1])
    np.testing.assert_allclose(loaded["logits"], _expected_5_24()["logits"], rtol=1e-5, atol=1e-6)
