"""The README's main job, end to end as a user runs it (smoke preset: the same steps at tiny sizes)."""

import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.smoke
@pytest.mark.slow
def test_quickstart_smoke_preset_runs_every_step(tmp_path):
    output = tmp_path / "quickstart"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "examples/quickstart.py", "--preset", "smoke", "--output_dir", str(output)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    # the model was reloaded as remote code, not from the installed package
    assert summary["model_class"].startswith("transformers_modules"), summary["model_class"]
    assert 0.0 <= summary["amc_chance"] < 1.0 and summary["amc_slots"] > 0
    assert 0.0 <= summary["amc_accuracy"] <= 1.0
    # The closing table: per task the pre-trained, from-scratch and images-shuffled scores, in [0, 1].
    assert set(summary["tasks"]) == {"vqa", "nlvr2", "snli_ve", "refcoco"}
    for task, scores in summary["tasks"].items():
        assert set(scores) == {"pretrained", "scratch", "images_shuffled"}, task
        assert all(0.0 <= value <= 1.0 for value in scores.values()), (task, scores)
    # The scarce label budget, the VQA question types and pre-training's held-out accuracies at its last step.
    assert set(summary["scarce"]) == set(summary["tasks"])
    for task, scores in summary["scarce"].items():
        assert set(scores) == {"pretrained", "scratch", "labels"} and scores["labels"] == 50, task
        assert 0.0 <= scores["pretrained"] <= 1.0 and 0.0 <= scores["scratch"] <= 1.0, (task, scores)
    assert set(summary["vqa_types"]) == {"what color is the", "what shape is the", "how many", "is there a"}
    for kind, row in summary["vqa_types"].items():
        assert {"pretrained", "scratch", "chance"} <= set(row) and row["questions"] > 0, kind
        assert all(0.0 <= row[name] <= 1.0 for name in ("pretrained", "scratch", "chance")), (kind, row)
    assert set(summary["pretraining"]) == {"step", "itm_accuracy", "amc_accuracy", "mlm_accuracy"}
    assert summary["pretraining"]["step"] == 20
    # VLP's regime: pre-training has more captions than any task has labelled rows.
    assert summary["world"]["pretrain_captions"] > max(summary["world"]["labelled"].values())
    assert len(summary["examples"]) == 5 and all(item["predicted"] for item in summary["examples"])
    assert (output / "loss_curves.png").stat().st_size > 10_000
    # The loss table has a column for every loss pre-training logged (the main job's five objectives and the total).
    first_row = json.loads((output / "pretrained" / "metrics.jsonl").read_text().splitlines()[0])
    logged = {key.split("/")[1] for key in first_row if key.startswith("train/") and key.endswith("loss")}
    assert logged == {"loss", "amc_loss", "mlm_loss", "itm_loss", "itc_loss", "mrfr_loss"}, logged
    header = next((line.split() for line in result.stdout.splitlines() if line.split()[:2] == ["step", "loss"]), None)
    assert header is not None, "no loss table (a line starting 'step loss') in the output:\n" + result.stdout[-3000:]
    assert set(header[1:]) == logged, header
    for line in ("AMC accuracy", "pre-trained", "scratch", "images shuffled", "mean over tasks of pre-trained",
                 "scarce labels", "VQA per question type", "what shape is the"):
        assert line in result.stdout
    for task in summary["tasks"]:
        assert any(row.split()[:1] == [task] for row in result.stdout.splitlines()), task
    # The README's inference example, on the folders this run wrote, in a fresh process.
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index("## Inference")) + len("```python\n")
    example = readme[start:readme.index("```", start)].replace("outputs/quickstart", str(output))
    inference = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
    assert inference.returncode == 0, inference.stdout[-3000:] + inference.stderr[-3000:]
    answers = ast.literal_eval(inference.stdout.strip().splitlines()[-1])
    assert len(answers) == 3 and all(set(answer) == {"answer", "score"} for answer in answers), answers


def test_side_by_side_stages_share_the_cores_and_a_failure_names_its_log(tmp_path, monkeypatch, capsys):
    """The main job runs the two starting points of a fine-tuning budget at once: each process gets its share of
    the cores (`OMP_NUM_THREADS`), every stage runs to its end, and a failed one stops the job with its log's tail."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_module", REPO_ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, quickstart)  # as an import would: its dataclasses look it up
    spec.loader.exec_module(quickstart)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    show = "import os, sys; print('threads', os.environ.get('OMP_NUM_THREADS')); sys.exit({})"
    logs = [tmp_path / "ok.log", tmp_path / "bad.log", tmp_path / "alone.log"]
    with pytest.raises(SystemExit) as failure:
        quickstart.run_side_by_side([("ok", [sys.executable, "-c", show.format(0)], logs[0]),
                                     ("bad", [sys.executable, "-c", show.format(3)], logs[1])])
    assert "bad failed (exit 3)" in str(failure.value) and "threads 2" in str(failure.value)
    assert "ok failed" not in str(failure.value) and logs[0].read_text().strip() == "threads 2"
    assert "ok: done in" in capsys.readouterr().out
    # One stage alone keeps the environment's threads.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    [seconds] = [quickstart.run_step("alone", [sys.executable, "-c", show.format(0)], logs[2])]
    assert seconds > 0 and logs[2].read_text().strip() == "threads None"


def test_images_shuffled_gives_every_row_another_image(synthetic_corpus):
    """The control of the closing table: text and labels stay, every image column comes from another image, and
    referring-expression labels are recomputed against the new regions. A split joined with its image table and
    the same rows in one table are shuffled alike by a seed."""
    import numpy as np
    from datasets import Dataset

    from cmal_processing.controls import images_shuffled
    from cmal_processing.corpus import corpus_features, image_table, load_corpus

    def plain(row):
        return {name: value.tolist() if isinstance(value, (np.ndarray, np.str_)) and value.dtype.kind == "U" else value
                for name, value in row.items()}

    for task in ("vqa", "nlvr2", "refcoco"):
        rows = load_corpus(synthetic_corpus / task)["validation"]
        shuffled = images_shuffled(rows, seed=0)
        assert image_table(shuffled) is image_table(rows)  # the regions are not copied: only the references change
        assert shuffled.column_names == rows.column_names and len(shuffled) == len(rows)
        assert list(shuffled["text"]) == list(rows["text"])
        for suffix in ("_0", "_1") if task == "nlvr2" else ("",):
            assert all(a != b for a, b in zip(shuffled[f"image_id{suffix}"], rows[f"image_id{suffix}"]))
            by_id = {str(row[f"image_id{suffix}"]): row[f"visual_feats{suffix}"] for row in rows}
            for row in shuffled:
                np.testing.assert_array_equal(row[f"visual_feats{suffix}"], by_id[str(row[f"image_id{suffix}"])])
        id_column = "image_id" if task != "nlvr2" else "image_id_0"
        assert list(images_shuffled(rows, seed=0)[id_column]) == list(shuffled[id_column])
        if task == "refcoco":
            for row in shuffled:
                assert len(row["region_ious"]) == len(row["visual_pos"])
                assert row["label"] == int(np.argmax(row["region_ious"]))
        # the same rows in one table (the layout before the image table) are shuffled alike
        one_table = Dataset.from_list([plain(row) for row in rows], features=corpus_features(rows))
        alike = images_shuffled(one_table, seed=0).with_format("numpy")
        for joined_row, one_table_row in zip(shuffled, alike):
            assert joined_row.keys() == one_table_row.keys()
            for name in joined_row:
                np.testing.assert_array_equal(joined_row[name], one_table_row[name], err_msg=f"{task} {name}")


def test_the_install_puts_only_names_of_the_project_into_site_packages():
    """setup.cfg installs `modeling_cmal`, `cmal_processing` (folders of those names) and `examples/cmal_examples/`
    as `cmal_examples`: no generic top-level name beside other packages, one import name for each."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    packages = setup["options"]["packages"].split()
    assert packages == ["modeling_cmal", "cmal_processing", "cmal_examples"]
    mapping = dict(line.split(" = ") for line in setup["options"]["package_dir"].strip().splitlines())
    assert mapping == {"cmal_examples": "examples/cmal_examples"}
    for package in packages:
        assert (REPO_ROOT / mapping.get(package, package) / "__init__.py").is_file(), package
    assert not (REPO_ROOT / "processing").exists(), "the corpus package is cmal_processing/, under one name"
    scripts = setup["options.entry_points"]["console_scripts"]
    assert "cmal-processing = cmal_processing.__main__:main" in scripts


def _top_level_imports(path) -> set[str]:
    """The top-level modules a file imports (absolute imports, anywhere in the file)."""
    import ast

    tree = ast.parse(path.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    return names | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level}


def _program_imports() -> dict[str, set[str]]:
    """The top-level modules each program and each module of cmal_examples imports (absolute imports)."""
    examples = REPO_ROOT / "examples"
    paths = sorted(examples.glob("*.py")) + sorted((examples / "cmal_examples").glob("*.py"))
    return {str(path.relative_to(examples)): _top_level_imports(path) for path in paths}


def test_no_program_patches_sys_path_or_imports_the_folder_name_processing():
    for name, imported in _program_imports().items():
        assert "processing" not in imported, f"{name} imports processing; the corpus package is cmal_processing"
        assert "sys.path" not in (REPO_ROOT / "examples" / name).read_text(), name


def test_imports_run_downward_programs_corpus_package_runtime_package():
    """modeling_cmal (the Hub code) imports neither the corpus package nor the programs' code; cmal_processing does
    not import the programs' code; nothing in the repository imports the old folder name `processing`."""
    layers = {"modeling_cmal": {"cmal_processing", "cmal_examples"}, "cmal_processing": {"cmal_examples"}}
    for package, forbidden in layers.items():
        for path in sorted((REPO_ROOT / package).glob("*.py")):
            assert not _top_level_imports(path) & forbidden, (str(path.relative_to(REPO_ROOT)), forbidden)
    # The corpus package reads the processor, not the training code (the pre-training collator).
    for path in sorted((REPO_ROOT / "cmal_processing").glob("*.py")):
        assert "collator_cmal" not in path.read_text(), str(path.relative_to(REPO_ROOT))
    for folder in ("modeling_cmal", "cmal_processing", "examples", "tests", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            assert "processing" not in _top_level_imports(path), str(path.relative_to(REPO_ROOT))


def test_no_program_imports_another_program():
    """The programs import the library and their shared package cmal_examples, never one another."""
    programs = {path.stem for path in (REPO_ROOT / "examples").glob("*.py")}
    for name, imported in _program_imports().items():
        assert not imported & programs, (name, imported & programs)


def test_no_import_circle_inside_the_corpus_package():
    """The modules of cmal_processing import one another (also lazily, inside functions) without a circle."""
    import ast

    package = REPO_ROOT / "cmal_processing"
    graph = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {(node.module or "").split(".")[0] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module} - {path.stem}
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import circle: " + " -> ".join([*trail, module])
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*trail, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("cmal_processing") is None,
                    reason="the project is not installed (pip install -e .)")
def test_the_builders_run_under_their_installed_name(tmp_path):
    for command in ([sys.executable, "-m", "cmal_processing", "--help"], ["cmal-processing", "--help"]):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "build" in result.stdout, result.stderr[-2000:]
