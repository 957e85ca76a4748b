"""examples/visualize_attention.py and examples/tsne.py: run as a user runs them (subprocesses) on a tiny CMAL that
was pre-trained for a few optimizer steps on synthetic scenes, they write non-empty PNGs; the attention shares and
the hypersphere points they draw are what they claim to be; a JSON file of the flags works as the flags do; bad
arguments, given as flags or in the JSON file, are refused with exit status 2 and a message naming the flag and the
value."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_cmal import CmalConfig, CmalForPreTraining
from modeling_cmal.collator_cmal import CmalPretrainingCollator
from modeling_cmal.processing_cmal import CmalProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # cmal_examples, the programs' shared package
FEATURE_DIM = 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"cmal_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered before it runs, as an import would: its dataclasses look it up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def visualize_attention():
    return load_script("visualize_attention")


@pytest.fixture(scope="module")
def tsne():
    return load_script("tsne")


def synthetic_rows(num_scenes: int, seed: int) -> list[dict]:
    """Pre-training rows (the columns of cmal_processing/schema.py) of synthetic scenes."""
    from cmal_processing.synthetic import generate_scene, render_scene, scene_regions

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_scenes):
        scene = generate_scene(rng)
        regions = scene_regions(scene, render_scene(scene), FEATURE_DIM)
        width, height = scene["image_size"]
        rows.append({"image_id": f"scene-{index}", "text": scene["captions"][index % len(scene["captions"])],
                     "visual_feats": regions["visual_feats"],
                     "visual_pos": regions["visual_pos"] / np.array([width, height, width, height], dtype=np.float32),
                     "tags": regions["tags"], "scores": regions["scores"]})
    return rows


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory, tokenizer):
    """A tiny CmalForPreTraining after 8 AdamW steps (AMC + MLM + ITM, the pre-training collator) on two batches of
    synthetic scenes, saved with its processor."""
    processor = CmalProcessor(tokenizer=tokenizer, max_regions=12)
    torch.manual_seed(0)
    config = CmalConfig.from_size("tiny", vocab_size=len(tokenizer), visual_feat_dim=FEATURE_DIM,
                                  num_anchor_concepts=len(processor.lexicon))
    model = CmalForPreTraining(config)
    collator = CmalPretrainingCollator(processor, config, seed=0)
    rows = synthetic_rows(32, seed=0)
    batches = [collator(rows[:16]), collator(rows[16:])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for step in range(8):
        loss = model(**batches[step % 2]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)), losses
    assert losses[6] < losses[0], f"the loss on the first batch did not go down: {losses}"
    folder = tmp_path_factory.mktemp("visualization") / "tiny-pretrained"
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_script(name: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_png(path: Path, min_width: int) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width >= min_width and image.height >= 200, image.size
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, "the figure is blank"


def test_attention_figure_from_the_command_line(trained_folder, tmp_path):
    output = tmp_path / "figures" / "attention.png"
    completed = run_script("visualize_attention", "--model_name_or_path", str(trained_folder), "--output",
                           str(output), "--seed", "1", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"wrote {output}" in completed.stdout
    assert_png(output, min_width=400)


def test_tsne_figure_from_the_command_line(trained_folder, tmp_path):
    output = tmp_path / "tsne.png"
    completed = run_script("tsne", "--model_name_or_path", str(trained_folder), "--output", str(output),
                           "--num_scenes", "30", "--perplexity", "10", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"wrote {output}" in completed.stdout
    assert_png(output, min_width=400)


def test_attention_figure_of_the_coffee_photo(visualize_attention, trained_folder, tmp_path, test_data_dir):
    output = visualize_attention.main(["--model_name_or_path", str(trained_folder), "--output",
                                       str(tmp_path / "coffee.png"), "--image", "coffee", "--real_image_seeds",
                                       str(test_data_dir / "real_image_seeds.json")])
    assert_png(output, min_width=400)


@pytest.fixture(scope="module")
def photo_and_detectors(tmp_path_factory):
    """A real photo (scikit-image's coffee, saved as a JPEG file) and two tiny random YOLOS detectors saved to
    folders: one with the model's feature width (every detection tagged `cup`), one with another width."""
    from skimage import data

    from conftest import save_tiny_detector

    root = tmp_path_factory.mktemp("photo")
    Image.fromarray(data.coffee()).save(root / "my photo.jpg")
    (root / "more").mkdir()
    for name in ("chelsea", "astronaut", "rocket"):
        Image.fromarray(getattr(data, name)()).save(root / "more" / f"{name}.png")
    return (root / "my photo.jpg", save_tiny_detector(root / "detector", FEATURE_DIM, ["cup"]),
            save_tiny_detector(root / "narrow_detector", 32, ["cup"]))


def test_attention_figure_of_any_image_file_with_a_detector(trained_folder, photo_and_detectors, tmp_path):
    """`--image PATH --detector DIR`: the detector's regions of a photo file, from the command line."""
    photo, detector, _ = photo_and_detectors
    output = tmp_path / "mine.png"
    completed = run_script("visualize_attention", "--model_name_or_path", str(trained_folder), "--output",
                           str(output), "--image", str(photo), "--detector", str(detector), "--score_threshold", "0",
                           "--caption", "a cup of coffee on a saucer", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"wrote {output}" in completed.stdout
    assert_png(output, min_width=400)


def test_image_files_that_cannot_be_used_are_refused(visualize_attention, trained_folder, photo_and_detectors,
                                                     tmp_path):
    photo, detector, narrow = photo_and_detectors
    common = ["--model_name_or_path", str(trained_folder), "--output", str(tmp_path / "x.png"), "--caption", "a cup",
              "--score_threshold", "0"]
    with pytest.raises(SystemExit, match="gives 32-d region features but the model was trained on 64-d ones"):
        visualize_attention.main(common + ["--image", str(photo), "--detector", str(narrow)])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not pixels")
    with pytest.raises(SystemExit, match="which PIL cannot read as an image"):
        visualize_attention.main(common + ["--image", str(not_an_image), "--detector", str(detector)])
    with pytest.raises(SystemExit, match="is not a transformers object detector"):
        visualize_attention.main(common + ["--image", str(photo), "--detector", str(tmp_path)])
    assert not (tmp_path / "x.png").exists()


def test_tsne_of_image_files_with_a_detector(trained_folder, photo_and_detectors, tmp_path):
    """`tsne.py --images FILE --detector DIR`: a JSON Lines file of photos (paths relative to it) and captions."""
    photo, detector, _ = photo_and_detectors
    listing = photo.parent / "photos.jsonl"
    listing.write_text("\n".join(json.dumps(item) for item in [
        {"image": photo.name, "caption": "a cup of coffee"},
        *({"image": f"more/{name}.png", "caption": f"a cup next to the {name}"}
          for name in ("chelsea", "astronaut", "rocket"))]) + "\n")
    output = tmp_path / "tsne_photos.png"
    completed = run_script("tsne", "--model_name_or_path", str(trained_folder), "--output", str(output), "--images",
                           str(listing), "--detector", str(detector), "--score_threshold", "0", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"wrote {output} (8 points)" in completed.stdout  # one anchor per photo: a word and a region point
    assert_png(output, min_width=400)


def test_tsne_image_listings_that_cannot_be_used_are_refused(tsne, trained_folder, photo_and_detectors, tmp_path):
    photo, detector, _ = photo_and_detectors
    listing = tmp_path / "bad.jsonl"
    common = ["--model_name_or_path", str(trained_folder), "--output", str(tmp_path / "x.png"), "--images",
              str(listing), "--detector", str(detector), "--score_threshold", "0"]
    for content, message in ((f'{{"image": "{photo}", "caption": ""}}\n', "line 1 must be an object with"),
                             ('{"image": "nothing.png", "caption": "a cup"}\n', "line 1: .* is not an image file"),
                             ("not json\n", "line 1 is not JSON")):
        listing.write_text(content)
        with pytest.raises(SystemExit, match=message):
            tsne.main(common)
    assert not (tmp_path / "x.png").exists()


def test_attention_shares_belong_to_anchor_words(visualize_attention, trained_folder):
    model, processor = visualize_attention.load_model_and_processor(str(trained_folder), attn_implementation="eager")
    for seed in range(3):
        _, regions, caption = visualize_attention.synthetic_example(FEATURE_DIM, seed)
        words, boxes = visualize_attention.anchor_word_attention(model, processor, regions, caption, layer=-1)
        assert words, caption
        assert boxes.shape == (len(regions["tags"]), 4)
        np.testing.assert_allclose(boxes, regions["visual_pos"], atol=1e-3)
        for word in words:
            assert word["share"].shape == (len(regions["tags"]),)
            assert word["share"].min() >= 0 and word["share"].sum() == pytest.approx(1.0, abs=1e-5)
            # Synthetic tags are shape names, themselves concepts of the lexicon: the anchor's region names it.
            assert regions["tags"][word["region"]] == word["concept"], (caption, word)
            assert word["word"] in caption.lower()


def test_regions_beyond_max_regions_keep_their_tags(visualize_attention, trained_folder):
    """With more regions than the processor keeps, the figure's labels still name the regions the model saw."""
    model, processor = visualize_attention.load_model_and_processor(str(trained_folder), attn_implementation="eager")
    processor.max_regions = 3
    for seed in range(6):
        _, regions, caption = visualize_attention.synthetic_example(FEATURE_DIM, seed)
        if len(regions["tags"]) <= 3:
            continue
        kept = visualize_attention.keep_top_regions(regions, processor.max_regions)
        top = np.sort(np.argsort(-regions["scores"], kind="stable")[:3])
        assert list(kept["tags"]) == [regions["tags"][index] for index in top]
        words, boxes = visualize_attention.anchor_word_attention(model, processor, kept, caption, layer=0)
        np.testing.assert_allclose(boxes, np.asarray(regions["visual_pos"])[top], atol=1e-3)
        for word in words:
            assert kept["tags"][word["region"]] == word["concept"]
        return
    pytest.fail("no scene with more than 3 regions among the first 6 seeds")


def test_tsne_points_lie_on_the_two_hyperspheres(tsne, trained_folder):
    model, processor = tsne.load_model_and_processor(str(trained_folder))
    examples = tsne.synthetic_examples(8, FEATURE_DIM, seed=0)
    points, concepts, is_word = tsne.anchor_embeddings(model, processor, examples, batch_size=3)
    assert points.shape == (len(concepts), model.config.hidden_size) and is_word.sum() == (~is_word).sum()
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-4)
    # Word and region points alternate, one pair per anchor, with the same concept.
    assert is_word[0::2].all() and not is_word[1::2].any()
    np.testing.assert_array_equal(concepts[0::2], concepts[1::2])
    names = set(processor.lexicon.concept_names[concept] for concept in concepts.tolist())
    assert names <= {"circle", "square", "triangle", "star", "heart", "diamond", "ring", "cross"}, names


MODEL = ["--model_name_or_path", "{model}", "--output", "a.png"]


@pytest.mark.parametrize("script, arguments, fragments", [
    ("visualize_attention", ["--output", "a.png"], ["required", "--model_name_or_path"]),
    ("visualize_attention", ["--model_name_or_path", "{missing}", "--output", "a.png"],
     ["--model_name_or_path must be a saved CMAL folder", "'{missing}'"]),
    ("visualize_attention", ["--model_name_or_path", "{model}", "--output", "a.jpg"],
     ["--output must be a .png file", "'a.jpg'"]),
    ("visualize_attention", ["--model_name_or_path", "{model}", "--output", "{folder}"],
     ["--output must be a .png file name, not a folder", "'{folder}'"]),
    ("visualize_attention", [*MODEL, "--seed", "-1"], ["--seed must be an integer >= 0", "got -1"]),
    ("visualize_attention", [*MODEL, "--seed", "one"], ["--seed", "'one'"]),
    ("visualize_attention", [*MODEL, "--image", "cat"], ["--image", "'cat'"]),
    ("visualize_attention", [*MODEL, "--caption", " "], ["--caption must be a non-empty caption", "got ' '"]),
    ("visualize_attention", [*MODEL, "--image", "coffee", "--real_image_seeds", "{missing}"],
     ["--real_image_seeds must be a file with --image coffee", "'{missing}'"]),
    ("visualize_attention", [*MODEL, "--colour", "red"], ["--colour", "red"]),
    ("visualize_attention", [*MODEL, "--image", "{folder}"],
     ["--image must be one of ['synthetic', 'coffee'] or an image file", "'{folder}'"]),
    ("visualize_attention", [*MODEL, "--image", "{model}/config.json", "--caption", "a cup"],
     ["--detector must be a transformers object-detector folder with --image PATH", "None"]),
    ("visualize_attention", [*MODEL, "--image", "{model}/config.json", "--detector", "{model}"],
     ["--caption must be given with --image PATH", "None"]),
    ("visualize_attention", [*MODEL, "--detector", "{model}"],
     ["--detector must be left unset with --image synthetic", "'{model}'"]),
    ("visualize_attention", [*MODEL, "--score_threshold", "1"], ["--score_threshold must be a float in [0, 1)",
                                                                  "got 1.0"]),
    ("tsne", [*MODEL, "--num_scenes", "0"], ["--num_scenes must be a positive integer", "got 0"]),
    ("tsne", [*MODEL, "--images", "{missing}", "--detector", "{model}"],
     ["--images must be a JSON Lines file", "'{missing}'"]),
    ("tsne", [*MODEL, "--images", "{model}/config.json"], ["--detector must be a transformers object-detector folder "
                                                            "with --images", "None"]),
    ("tsne", [*MODEL, "--detector", "{model}"], ["--detector must be left unset without --images", "'{model}'"]),
    ("tsne", [*MODEL, "--batch_size", "-2"], ["--batch_size must be a positive integer", "got -2"]),
    ("tsne", [*MODEL, "--perplexity", "0"], ["--perplexity must be a positive number", "got 0.0"]),
    ("tsne", [*MODEL, "--perplexity", "nan"], ["--perplexity must be a positive number", "got nan"]),
    ("tsne", [*MODEL, "--seed", "-3"], ["--seed must be an integer >= 0", "got -3"]),
    ("tsne", [*MODEL, "--seed", str(2**32)], ["--seed must be an integer in [0, 2**32)", f"got {2**32}"]),
    ("tsne", ["--model_name_or_path", "{model}", "--output", "{model}"], ["--output must be a .png file",
                                                                           "'{model}'"]),
    ("tsne", ["--model_name_or_path", "{missing}", "--output", "a.png"],
     ["--model_name_or_path must be a saved CMAL folder", "'{missing}'"]),
])
def test_bad_arguments_are_refused_with_a_message(script, arguments, fragments, trained_folder, tmp_path, capsys,
                                                  visualize_attention, tsne):
    """Exit status 2 (argparse's) and a message naming the flag and the value."""
    module = {"visualize_attention": visualize_attention, "tsne": tsne}[script]
    names = {"model": trained_folder, "missing": tmp_path / "missing", "folder": tmp_path / "figure.png"}
    names["folder"].mkdir()  # a folder named like a PNG
    arguments = [argument.format(**names) for argument in arguments]
    with pytest.raises(SystemExit) as raised:
        module.parse_args(arguments)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment.format(**names) in error, error


def write_json(path: Path, values) -> str:
    path.write_text(json.dumps(values))
    return str(path)


@pytest.mark.parametrize("script, flags", [
    ("visualize_attention", {"seed": 2, "layer": 0, "image": "synthetic"}),
    ("tsne", {"num_scenes": 30, "perplexity": 10, "seed": 1, "batch_size": 7}),
])
def test_a_json_args_file_gives_the_flags(script, flags, trained_folder, tmp_path, visualize_attention, tsne):
    """`program.py args.json` (the flags' names as keys) parses to what the same flags give, and draws the figure."""
    module = {"visualize_attention": visualize_attention, "tsne": tsne}[script]
    output = tmp_path / "figures" / f"{script}.png"
    values = {"model_name_or_path": str(trained_folder), "output": str(output), **flags}
    from_json = module.parse_args([write_json(tmp_path / "args.json", values)])
    command_line = [item for name, value in values.items() for item in (f"--{name}", str(value))]
    assert from_json == module.parse_args(command_line)
    assert all(getattr(from_json, name) == value for name, value in values.items())
    assert module.main([str(tmp_path / "args.json")]) == output
    assert_png(output, min_width=400)


def test_a_json_args_file_from_the_command_line(trained_folder, tmp_path):
    output = tmp_path / "attention.png"
    arguments = write_json(tmp_path / "args.json", {"model_name_or_path": str(trained_folder),
                                                     "output": str(output), "seed": 1})
    completed = run_script("visualize_attention", arguments, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"wrote {output}" in completed.stdout
    assert_png(output, min_width=400)


@pytest.mark.parametrize("script, values, fragments", [
    ("visualize_attention", {"seed": -1}, ["--seed must be an integer >= 0", "got -1"]),
    ("visualize_attention", {"seed": "1"}, ["--seed must be an integer", "got '1'"]),
    ("visualize_attention", {"image": "cat"}, ["--image must be one of ['synthetic', 'coffee']", "got 'cat'"]),
    ("visualize_attention", {"caption": ""}, ["--caption must be a non-empty caption", "got ''"]),
    ("visualize_attention", {"layer": 1.5}, ["--layer must be an integer", "got 1.5"]),
    ("visualize_attention", {"output": None}, ["--output must be a string", "got None"]),
    ("visualize_attention", {"model_name_or_path": "{missing}"},
     ["--model_name_or_path must be a saved CMAL folder", "'{missing}'"]),
    ("tsne", {"num_scenes": 0}, ["--num_scenes must be a positive integer", "got 0"]),
    ("tsne", {"batch_size": True}, ["--batch_size must be an integer", "got True"]),
    ("tsne", {"perplexity": "high"}, ["--perplexity must be a number", "got 'high'"]),
    ("tsne", {"perplexity": -1}, ["--perplexity must be a positive number", "got -1.0"]),
    ("tsne", {"output": "a.jpg"}, ["--output must be a .png file", "got 'a.jpg'"]),
    ("tsne", {"colour": "red"}, ["no flag of this program: ['colour']"]),
    ("tsne", {"output": "drop"}, ["must give --output", "'output'"]),
])
def test_bad_values_in_a_json_args_file_are_refused_with_a_message(script, values, fragments, trained_folder,
                                                                   tmp_path, capsys, visualize_attention, tsne):
    module = {"visualize_attention": visualize_attention, "tsne": tsne}[script]
    names = {"missing": tmp_path / "missing"}
    arguments = {"model_name_or_path": str(trained_folder), "output": "a.png"}
    arguments.update({name: value.format(**names) if isinstance(value, str) else value
                      for name, value in values.items()})
    if arguments["output"] == "drop":
        del arguments["output"]
    with pytest.raises(SystemExit) as raised:
        module.parse_args([write_json(tmp_path / "args.json", arguments)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment.format(**names) in error, error


@pytest.mark.parametrize("content, fragment", [
    (None, "is not a readable JSON file"),
    ("{not json", "is not a readable JSON file"),
    ("[1, 2]", "must hold one JSON object"),
])
def test_an_unreadable_json_args_file_is_refused(content, fragment, tsne, tmp_path, capsys):
    path = tmp_path / "args.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as raised:
        tsne.parse_args([str(path)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert fragment in error and repr(str(path)) in error, error


def test_attention_layer_out_of_range_is_named(visualize_attention, trained_folder, tmp_path):
    with pytest.raises(SystemExit, match=r"--layer 2 is out of range: the model's unified encoder has 2 layers"):
        visualize_attention.main(["--model_name_or_path", str(trained_folder), "--output", str(tmp_path / "a.png"),
                                  "--layer", "2"])
    assert not (tmp_path / "a.png").exists()
