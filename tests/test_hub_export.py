"""write_hub_folder, add_hub_files and `python -m cmal_examples.hub_export`: folder contents, config and processor auto
maps, custom pipelines, the model card (huggingface_hub.ModelCard), loading in a fresh process, atomic writes, no side
effect on the model's config."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))  # cmal_examples, the programs' shared package

from cmal_examples.hub_export import add_hub_files, code_files, export, main, write_hub_folder  # noqa: E402
from modeling_cmal import (
    CMAL_AUTO_MAP,
    CmalConfig,
    CmalForPreTraining,
    CmalForQuestionAnswering,
    CmalForReferringExpression,
    CmalModel,
)
from modeling_cmal.anchoring import ConceptLexicon
from modeling_cmal.pipelines_cmal import CMAL_PIPELINES
from modeling_cmal.processing_cmal import CmalProcessor

CODE_FILES = {"configuration_cmal.py", "modeling_cmal.py", "validation_cmal.py", "distributed_cmal.py",
              "processing_cmal.py", "pipelines_cmal.py", "anchoring.py",
              "region_extraction.py", "region_processing_cmal.py"}
PROCESSOR_FILES = {"processor_config.json", "concept_lexicon.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def processor(tokenizer):
    return CmalProcessor(tokenizer=tokenizer, max_regions=8)


def make_config(processor, **fields):
    return CmalConfig(vocab_size=len(processor.tokenizer), hidden_size=32, num_attention_heads=2, intermediate_size=64,
                      num_text_layers=1, num_visual_layers=1, num_unified_layers=1, visual_feat_dim=12,
                      num_anchor_concepts=len(processor.lexicon), **fields)


def front_matter(card: str) -> dict[str, object]:
    """The YAML header of a model card, as huggingface_hub reads it."""
    return ModelCard(card).data.to_dict()


def test_pretrained_folder_is_complete(tmp_path, processor):
    model = CmalForPreTraining(make_config(processor))
    folder = write_hub_folder(model, processor, tmp_path / "cmal-tiny")
    names = {path.name for path in folder.iterdir()}
    assert names == {"config.json", "model.safetensors", "README.md", *CODE_FILES, *PROCESSOR_FILES}
    assert {path.name for path in code_files()} == CODE_FILES
    assert [path.name for path in tmp_path.iterdir()] == ["cmal-tiny"], "the staging folder must be gone"

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {**config["auto_map"], **CMAL_AUTO_MAP}
    assert config["architectures"] == ["CmalForPreTraining"]
    assert set(config["custom_pipelines"]) == set(CMAL_PIPELINES)
    pipelines_code = (folder / "pipelines_cmal.py").read_text()
    for task, entry in config["custom_pipelines"].items():
        module, class_name = entry["impl"].split(".")
        assert (folder / f"{module}.py").is_file() and f"class {class_name}(" in pipelines_code
        assert entry["pt"] == [CMAL_PIPELINES[task].auto_class_name]
    for reference in config["auto_map"].values():
        module, class_name = reference.split(".")
        assert f"class {class_name}(" in (folder / f"{module}.py").read_text()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_cmal.CmalProcessor"}

    card = (folder / "README.md").read_text()
    header = front_matter(card)
    assert header["license"] == "apache-2.0" and header["library_name"] == "transformers"
    assert header["pipeline_tag"] == "visual-question-answering"
    assert {"vision-language", "cmal", "multimodal", "vqa", *CMAL_PIPELINES} <= set(header["tags"])
    assert not re.search(r"\{\{ ?[a-z_]+ ?\}\}|\{#", card), "every variable filled, the template's comment left out"
    assert "# cmal-tiny" in card and "`CmalForPreTraining`" in card
    assert f"| parameters | {sum(parameter.numel() for parameter in model.parameters()):,} |" in card
    assert "_No measured results were passed in for this checkpoint._" in card
    assert "@inproceedings{ma2022cmal" in card and "2410.12595" in card


@pytest.mark.smoke
def test_head_folder_loads_in_a_fresh_process_without_the_package(tmp_path, processor):
    torch.manual_seed(0)
    answers = {0: "red", 1: "blue", 2: "cup"}
    model = CmalForQuestionAnswering(make_config(processor, id2label=answers)).eval()
    folder = write_hub_folder(model, processor, tmp_path / "vqa", metrics={"vqa_accuracy": 0.5, "eval_samples": 40},
                              metrics_source="synthetic scenes, validation split (a test fixture)")
    config = json.loads((folder / "config.json").read_text())
    assert list(config["custom_pipelines"]) == ["cmal-vqa"]
    card = (folder / "README.md").read_text()
    assert "Source: synthetic scenes, validation split (a test fixture)" in card
    assert "| `vqa_accuracy` | 0.5 |" in card and "| `eval_samples` | 40 |" in card
    assert "labels | 3: `red`, `blue`, `cup`" in card
    pretrained = write_hub_folder(CmalForPreTraining(make_config(processor)), processor, tmp_path / "pretrained")

    inputs = dict(processor(text=["a cup on a red saucer"], return_tensors="pt",
                            regions=[{"features": torch.randn(2, 12), "boxes": [[0, 0, 5, 5], [2, 2, 8, 9]],
                                      "image_size": (10, 10), "tags": ["cup", "saucer"]}]))
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "expected.pt")
    # (the same guard as the remote-code scripts of test_model_core.py and test_pipelines.py: each script runs alone)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_cmal"] = None
        try:
            import modeling_cmal
            raise SystemExit("modeling_cmal must not be importable here")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor, pipeline

        model = AutoModelForVisualQuestionAnswering.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, torch.load({str(tmp_path / 'expected.pt')!r}))
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "CmalProcessor" and len(processor.lexicon) == {len(processor.lexicon)}
        assert pipeline(model={str(folder)!r}, trust_remote_code=True).task == "cmal-vqa"
        try:
            pipeline(model={str(pretrained)!r}, trust_remote_code=True)
            raise SystemExit("a folder with five pipelines must need task=")
        except RuntimeError as error:
            assert "multiple tasks" in str(error), error
        matching = pipeline("cmal-image-text-matching", model={str(pretrained)!r}, trust_remote_code=True)
        assert type(matching.model).__name__ == "CmalForImageTextMatching"
        print("HUB-OK")
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
    assert "HUB-OK" in completed.stdout, completed.stderr[-4000:]


def test_a_failed_write_leaves_nothing_behind(tmp_path, processor, monkeypatch):
    model = CmalForReferringExpression(make_config(processor))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(processor, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_hub_folder(model, processor, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    template = tmp_path / "card.md"
    template.write_text("# {{ model_name }} {{ accuracy_on_the_moon }}\n")
    with pytest.raises(ValueError, match="accuracy_on_the_moon"):
        write_hub_folder(model, processor, tmp_path / "out", model_card=template)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["card.md"]


def test_an_existing_folder_keeps_its_other_files(tmp_path, processor):
    folder = tmp_path / "run"
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (folder / "all_results.json").write_text('{"eval_accuracy": 0.9}')
    (folder / "model-00001-of-00002.safetensors").write_text("stale shard")
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "README.md").write_text("old card")
    write_hub_folder(CmalForReferringExpression(make_config(processor)), processor, folder)
    names = {path.name for path in folder.iterdir()}
    assert {"checkpoint-10", "all_results.json", "model.safetensors", "config.json"} <= names
    assert not {"model-00001-of-00002.safetensors", "model.safetensors.index.json"} & names
    assert front_matter((folder / "README.md").read_text())["license"] == "apache-2.0"
    assert (folder / "checkpoint-10" / "trainer_state.json").read_text() == "{}"
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_bad_arguments_are_named(tmp_path, processor, tokenizer):
    vqa = CmalForQuestionAnswering(make_config(processor))
    with pytest.raises(ValueError, match="pipeline_task 'cmal-visual-reasoning' needs a CmalForVisualReasoning"):
        write_hub_folder(vqa, processor, tmp_path / "a", pipeline_task="cmal-visual-reasoning")
    with pytest.raises(ValueError, match="pipeline_task must be one of"):
        write_hub_folder(vqa, processor, tmp_path / "a", pipeline_task="visual-question-answering")
    with pytest.raises(ValueError, match="metrics_source"):
        write_hub_folder(vqa, processor, tmp_path / "a", metrics={"accuracy": 0.4})
    with pytest.raises(ValueError, match="model_card"):
        write_hub_folder(vqa, processor, tmp_path / "a", model_card=tmp_path / "missing.md")
    small_lexicon = CmalProcessor(tokenizer=tokenizer, lexicon=ConceptLexicon(["cup", "saucer"]))
    with pytest.raises(ValueError, match="num_anchor_concepts"):
        write_hub_folder(vqa, small_lexicon, tmp_path / "a")
    with pytest.raises(ValueError, match="model must be a CMAL model"):
        write_hub_folder(torch.nn.Linear(2, 2), processor, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    # A trunk or a pre-training model may declare any subset of the tasks.
    trunk = write_hub_folder(CmalModel(make_config(processor)), processor, tmp_path / "trunk",
                             pipeline_task=["cmal-image-text-matching", "cmal-vqa"])
    config = json.loads((trunk / "config.json").read_text())
    assert list(config["custom_pipelines"]) == ["cmal-image-text-matching", "cmal-vqa"]


def test_command_line_exports_a_trained_folder(tmp_path, processor, capsys):
    trained = tmp_path / "trained"
    model = CmalForReferringExpression(make_config(processor))
    model.save_pretrained(trained)
    processor.save_pretrained(trained)
    (tmp_path / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.625, "epoch": 3.0}))
    folder = export(["--model", str(trained), "--output", str(tmp_path / "hub"), "--metrics",
                     str(tmp_path / "eval_results.json"), "--metrics_source", "synthetic RefCOCO+-style validation",
                     "--repo_id", "someone/cmal-refcoco"])
    assert "wrote" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert list(config["custom_pipelines"]) == ["cmal-referring-expression"]
    card = (folder / "README.md").read_text()
    assert front_matter(card)["pipeline_tag"] == "zero-shot-object-detection"
    assert "| `eval_accuracy` | 0.625 |" in card and "synthetic RefCOCO+-style validation" in card
    assert "# someone/cmal-refcoco" in card
    assert 'pipeline("cmal-referring-expression", model="someone/cmal-refcoco", trust_remote_code=True)' in card
    reloaded = CmalForReferringExpression.from_pretrained(folder)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)
    with pytest.raises(SystemExit) as exited:
        main(["--model", str(trained), "--output", str(tmp_path / "other"), "--task", "cmal-nothing"])
    assert exited.value.code == 2 and "argument --task: invalid choice: 'cmal-nothing'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_the_console_script_exits_0_after_an_export(tmp_path, processor):
    """`cmal-hub-export` is `sys.exit(cmal_examples.hub_export:main())`: a written folder is exit status 0 and
    no path on stderr (a returned path would be exit status 1 and the path printed there)."""
    from importlib.metadata import entry_points

    for script in entry_points(group="console_scripts", name="cmal-hub-export"):  # when the package is installed
        assert script.value == "cmal_examples.hub_export:main"
    trained = tmp_path / "trained"
    CmalForQuestionAnswering(make_config(processor, id2label={0: "red", 1: "blue"})).save_pretrained(trained)
    processor.save_pretrained(trained)
    code = ("import sys; from cmal_examples.hub_export import main; "
            f"sys.exit(main(['--model', {str(trained)!r}, '--output', {str(tmp_path / 'hub')!r}]))")
    path = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "examples"), os.environ.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                               env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"wrote {tmp_path / 'hub'}") and str(tmp_path / "hub") not in completed.stderr
    assert (tmp_path / "hub" / "config.json").is_file() and (tmp_path / "hub" / "README.md").is_file()


def test_the_command_line_is_a_dataclass_of_flags(capsys):
    """`HfArgumentParser` over `HubExportArguments`: --task repeats (or takes several), a bad command line stops
    with exit status 2 and names the flag."""
    from cmal_examples.hub_export import parse_args

    args = parse_args(["--model", "m", "--output", "o", "--task", "cmal-vqa", "--task", "cmal-image-text-matching"])
    assert args.task == ["cmal-vqa", "cmal-image-text-matching"] and args.metrics is None
    assert parse_args(["--model", "m", "--output", "o", "--task", "cmal-vqa", "cmal-visual-entailment"]).task == [
        "cmal-vqa", "cmal-visual-entailment"]
    assert parse_args(["--model", "m", "--output", "o"]).task is None
    for argv, message in ((["--output", "o"], "the following arguments are required: --model"),
                          (["--model", "m", "--output", "o", "--push", "x"], "['--push', 'x']")):
        with pytest.raises(SystemExit) as exited:
            parse_args(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_measured_metrics_are_the_cards_eval_results(tmp_path, processor):
    model = CmalForQuestionAnswering(make_config(processor, id2label={0: "red", 1: "blue"}))
    folder = write_hub_folder(model, processor, tmp_path / "vqa", metrics={"vqa_accuracy": 0.5},
                              metrics_source="synthetic scenes, validation split")
    card = ModelCard.load(folder / "README.md")
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.task_type) == ("vqa_accuracy", 0.5,
                                                                           "visual-question-answering")
    assert result.dataset_name == "synthetic scenes, validation split"


def test_hub_files_are_added_to_a_saved_folder_from_a_copy_of_its_config(tmp_path, processor):
    """What the fine-tuning programs do after Trainer.save_model: the weights stay as saved, the config gains the
    auto maps and pipelines, the code and the card appear."""
    model = CmalForReferringExpression(make_config(processor))
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    add_hub_files(tmp_path / "run", metrics={"iou_accuracy": 0.25}, metrics_source="a test fixture")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["auto_map"] == {**config["auto_map"], **CMAL_AUTO_MAP}
    assert list(config["custom_pipelines"]) == ["cmal-referring-expression"]
    assert CODE_FILES <= {path.name for path in (tmp_path / "run").iterdir()}
    assert "| `iou_accuracy` | 0.25 |" in (tmp_path / "run" / "README.md").read_text()
    with pytest.raises(ValueError, match="has no config.json"):
        add_hub_files(tmp_path / "nothing")


def test_exporting_leaves_the_models_config_alone(tmp_path, processor):
    model = CmalForReferringExpression(make_config(processor))
    write_hub_folder(model, processor, tmp_path / "out")
    # transformers' own save may record the class's Auto entry; every other head is the folder's business only
    assert set(getattr(model.config, "auto_map", None) or {}) <= {"AutoConfig"}
    assert getattr(model.config, "custom_pipelines", None) is None
    assert set(json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]) == set(CMAL_AUTO_MAP)
