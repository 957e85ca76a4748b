"""The five CMAL pipelines: Hub folders that load in a fresh process without the package (regions and images
through a tiny random detector), batches, top_k, and a ValueError naming the argument for every bad input."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from conftest import REPO_ROOT, save_tiny_detector

sys.path.insert(0, str(REPO_ROOT / "examples"))  # cmal_examples, the programs' shared package (Hub export)

from cmal_examples.hub_export import write_hub_folder  # noqa: E402

from modeling_cmal import (  # noqa: E402
    CmalConfig,
    CmalForImageTextMatching,
    CmalForQuestionAnswering,
    CmalForReferringExpression,
    CmalForVisualEntailment,
    CmalForVisualReasoning,
)
from modeling_cmal.pipelines_cmal import CMAL_PIPELINES  # noqa: E402
from modeling_cmal.processing_cmal import CmalProcessor  # noqa: E402
from modeling_cmal.region_extraction import CmalRegionExtractor  # noqa: E402

FEATURE_DIM = 16
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask",
                "anchor_pairs", "anchor_concept_ids")
ANSWERS = ["red", "blue", "cup", "spoon", "two", "yes", "no"]
HEADS = {
    "cmal-vqa": (CmalForQuestionAnswering, {"id2label": dict(enumerate(ANSWERS))}),
    "cmal-visual-entailment": (CmalForVisualEntailment,
                               {"id2label": {0: "entailment", 1: "neutral", 2: "contradiction"}}),
    "cmal-visual-reasoning": (CmalForVisualReasoning, {"id2label": {0: "False", 1: "True"}}),
    "cmal-referring-expression": (CmalForReferringExpression, {}),
    "cmal-image-text-matching": (CmalForImageTextMatching, {}),
}


@pytest.fixture(scope="module")
def processor(tokenizer):
    return CmalProcessor(tokenizer=tokenizer, max_regions=8)


def make_model(task, processor, seed=0, **overrides):
    head_class, fields = HEADS[task]
    torch.manual_seed(seed)
    config = CmalConfig(vocab_size=len(processor.tokenizer), hidden_size=32, num_attention_heads=2,
                        intermediate_size=64, num_text_layers=1, num_visual_layers=1, num_unified_layers=1,
                        visual_feat_dim=FEATURE_DIM, num_anchor_concepts=len(processor.lexicon),
                        **{**fields, **overrides})
    return head_class(config).eval()


@pytest.fixture(scope="module")
def photo_regions(test_data_dir):
    """Hand-written boxes and tags of two real photos (pixels, with image_size), seeded random features."""
    seeds = json.loads((test_data_dir / "real_image_seeds.json").read_text())
    rng = np.random.default_rng(0)
    regions = {}
    for name in ("coffee", "astronaut"):
        annotated = seeds["regions"][name]
        regions[name] = {
            "visual_feats": rng.normal(size=(len(annotated), FEATURE_DIM)).astype(np.float32),
            "visual_pos": [region["box"] for region in annotated],
            "tags": [region["tag"] for region in annotated],
            "image_size": tuple(seeds["images"][name]["size"]),
        }
    return regions


def direct_logits(model, processor, text, regions):
    """The head's logits for one (text, image) or, for visual reasoning, one (text, (left, right)), computed without
    the pipeline: each image encoded on its own and padded by hand."""
    with torch.no_grad():
        if not isinstance(model, CmalForVisualReasoning):
            encoding = processor(text=[text], regions=[regions], return_tensors="pt")
            return model(**{name: encoding[name] for name in MODEL_INPUTS}).logits[0]
        encodings = [processor(text=[text], regions=[image], return_tensors="pt") for image in regions]
        inputs = {name: encodings[0][name] for name in ("input_ids", "attention_mask", "token_type_ids")}
        for name in MODEL_INPUTS[3:]:
            length = max(encoding[name].shape[1] for encoding in encodings)
            value = -1 if name.startswith("anchor") else 0
            padded = [F.pad(encoding[name], [0, 0] * (encoding[name].dim() - 2) + [0, length - encoding[name].shape[1]],
                            value=value) for encoding in encodings]
            inputs[name] = torch.stack(padded, dim=1)
        return model(**inputs).logits[0]


def expected_result(task, model, processor, text, regions, top_k=1):
    """What the pipeline must return, from the head's logits."""
    logits = direct_logits(model, processor, text, regions).float()
    id2label = model.config.id2label
    if task == "cmal-vqa":
        scores = logits.sigmoid()
        order = scores.argsort(descending=True)[:top_k].tolist()
        return [{"answer": id2label[index], "score": scores[index].item()} for index in order]
    if task == "cmal-visual-entailment":
        probabilities = logits.softmax(-1)
        order = probabilities.argsort(descending=True)[:top_k].tolist()
        return [{"label": id2label[index], "score": probabilities[index].item()} for index in order]
    if task == "cmal-visual-reasoning":
        probabilities = logits.softmax(-1)
        return {"label": id2label[probabilities.argmax().item()], "score": probabilities.max().item()}
    if task == "cmal-referring-expression":
        probabilities = logits.softmax(-1)
        index = probabilities.argmax().item()
        # Regions that a random detector gives identical features and boxes tie: any of them is the answer (another
        # process may sum in another order and pick another).
        tied = (probabilities >= probabilities.max() - 1e-6).nonzero().flatten().tolist()
        return {"box": [float(value) for value in regions["visual_pos"][index]], "score": probabilities[index].item(),
                "region_index": tied if len(tied) > 1 else index, "normalized": "image_size" not in regions}
    return {"match_probability": logits.softmax(-1)[1].item(), "is_match": logits.softmax(-1)[1].item() >= 0.5}


def assert_same_result(actual, expected):
    if isinstance(expected, list):
        assert len(actual) == len(expected)
        for actual_item, expected_item in zip(actual, expected):
            assert_same_result(actual_item, expected_item)
        return
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert actual[key] == pytest.approx(value, abs=1e-4), key
        elif key == "box":
            assert actual[key] == pytest.approx(value, abs=1e-2)
        elif key == "region_index" and isinstance(value, list):
            assert actual[key] in value, key
        else:
            assert actual[key] == value, key


TEXTS = {
    "cmal-vqa": "what is next to the cup?",
    "cmal-visual-entailment": "there is a drink on the table",
    "cmal-visual-reasoning": "one of the images shows a cup",
    "cmal-referring-expression": "shiny silver spoon",
    "cmal-image-text-matching": "a cup of espresso on a red saucer with a spoon",
}


def task_inputs(task, photo_regions):
    if task == "cmal-visual-reasoning":
        return {"text": TEXTS[task], "regions": (photo_regions["coffee"], photo_regions["astronaut"])}
    return {"text": TEXTS[task], "regions": photo_regions["coffee"]}


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """A randomly initialised YOLOS detector (hidden size = the models' visual_feat_dim) and its image processor."""
    return save_tiny_detector(tmp_path_factory.mktemp("detector"), FEATURE_DIM, ["cup", "saucer", "spoon"])


def test_the_five_tasks_are_registered_in_process():
    assert set(CMAL_PIPELINES) <= set(PIPELINE_REGISTRY.get_supported_tasks())
    for task, pipeline_class in CMAL_PIPELINES.items():
        registered = PIPELINE_REGISTRY.supported_tasks[task]
        assert registered["impl"] is pipeline_class
        assert [model_class.__name__ for model_class in registered["pt"]] == [pipeline_class.auto_class_name]


@pytest.mark.smoke
def test_every_pipeline_from_a_hub_folder_in_a_process_without_the_package(tmp_path, processor, photo_regions,
                                                                             tiny_detector):
    folders, expected = {}, {}
    for seed, task in enumerate(CMAL_PIPELINES):
        model = make_model(task, processor, seed=seed)
        folders[task] = str(write_hub_folder(model, processor, tmp_path / task.removeprefix("cmal-")))
        inputs = task_inputs(task, photo_regions)
        top_k = 3 if CMAL_PIPELINES[task].ranks_labels else 1
        expected[task] = expected_result(task, model, processor, inputs["text"], inputs["regions"], top_k=top_k)
    photo = tmp_path / "coffee.png"
    from skimage import data

    Image.fromarray(data.coffee()).save(photo)
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    extractor = CmalRegionExtractor(AutoModelForObjectDetection.from_pretrained(tiny_detector),
                                    AutoImageProcessor.from_pretrained(tiny_detector), score_threshold=0.0, top_k=5)
    detected = extractor(Image.open(photo).convert("RGB"))
    vqa_model = make_model("cmal-vqa", processor, seed=0)
    referring_model = make_model("cmal-referring-expression", processor, seed=3)
    expected["image-vqa"] = expected_result("cmal-vqa", vqa_model, processor, TEXTS["cmal-vqa"], detected, top_k=2)
    expected["image-referring"] = expected_result("cmal-referring-expression", referring_model, processor,
                                                  TEXTS["cmal-referring-expression"], detected)
    (tmp_path / "inputs.json").write_text(json.dumps({
        task: {"text": inputs["text"], "regions": inputs["regions"]}
        for task, inputs in ((task, task_inputs(task, photo_regions)) for task in CMAL_PIPELINES)
    }, default=lambda array: array.tolist()))

    script = textwrap.dedent(f"""
        import json, sys
        # CI installs the package in editable mode: hide it, as on a machine that only has transformers.
        sys.modules["modeling_cmal"] = None
        try:
            import modeling_cmal
            raise SystemExit("modeling_cmal must not be importable here")
        except ImportError:
            pass
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        folders = {folders!r}
        inputs = json.loads(open({str(tmp_path / 'inputs.json')!r}).read())
        results = {{}}
        for task, folder in folders.items():
            # As a user of a Hub folder calls it: no task, it comes from the folder's one custom_pipelines entry.
            pipe = pipeline(model=folder, trust_remote_code=True)
            assert pipe.task == task, (task, pipe.task)
            assert type(pipe).__module__.startswith("transformers_modules"), type(pipe)
            item = inputs[task]
            if task == "cmal-visual-reasoning":
                item["regions"] = tuple(item["regions"])
            top_k = {{"top_k": 3}} if task in ("cmal-vqa", "cmal-visual-entailment") else {{}}
            results[task] = pipe(**item, **top_k)
            results[task + " as a dict"] = pipe(item, **top_k)
            for index, result in enumerate(pipe([item, item, item], batch_size=2, **top_k)):
                results[task + " in a batch, item " + str(index)] = result
            try:
                pipe(text=item["text"])
                raise SystemExit(f"{{task}}: a call without regions must fail")
            except ValueError as error:
                assert "regions" in str(error), error
        # The task may also be named.
        named = pipeline("cmal-vqa", model=folders["cmal-vqa"], trust_remote_code=True)
        assert named.task == "cmal-vqa" and type(named).__name__ == "CmalVisualQuestionAnsweringPipeline"

        # image= through a detector: the region extractor ships with the folder's code.
        Extractor = get_class_from_dynamic_module("region_extraction.CmalRegionExtractor", folders["cmal-vqa"])
        extractor = Extractor(AutoModelForObjectDetection.from_pretrained({str(tiny_detector)!r}),
                              AutoImageProcessor.from_pretrained({str(tiny_detector)!r}), score_threshold=0.0, top_k=5)
        vqa = pipeline("cmal-vqa", model=folders["cmal-vqa"], trust_remote_code=True, region_extractor=extractor)
        results["image-vqa"] = vqa(text=inputs["cmal-vqa"]["text"], image={str(photo)!r}, top_k=2)
        referring = pipeline("cmal-referring-expression", model=folders["cmal-referring-expression"],
                             trust_remote_code=True, region_extractor=extractor)
        results["image-referring"] = referring(text=inputs["cmal-referring-expression"]["text"], image={str(photo)!r})
        print("RESULTS=" + json.dumps(results))
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=1800)  # catches a hang, not a slow machine
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULTS=")]
    assert lines, completed.stderr[-4000:]
    results = json.loads(lines[0].removeprefix("RESULTS="))
    for name, result in results.items():
        assert_same_result(result, expected[name.split(" ")[0]])
    assert len(results) == 2 + 5 * 5
    assert len(results["cmal-vqa"]) == 3 and len(results["cmal-visual-entailment"]) == 3
    referred = results["image-referring"]
    width, height = Image.open(photo).size
    assert not referred["normalized"]
    assert 0 <= referred["box"][0] <= referred["box"][2] <= width and 0 <= referred["box"][1] <= referred["box"][3] <= height


@pytest.mark.parametrize("task", list(CMAL_PIPELINES))
def test_batches_match_single_calls_across_region_counts(task, processor, photo_regions):
    # Filling at anchors makes the anchor rows (and their padding) change the outputs, unlike the default "keep".
    model = make_model(task, processor, default_anchor_action="fill_region")
    pipe = pipeline(task, model=model, processor=processor, device=-1)
    rng = np.random.default_rng(1)
    items = []
    for count, text in zip((1, 3, 6), ("the cup", "a spoon on a red saucer next to the cup", "what is it?")):
        regions = {"visual_feats": rng.normal(size=(count, FEATURE_DIM)).astype(np.float32),
                   "visual_pos": np.sort(rng.random((count, 2, 2)), axis=1).reshape(count, 4),
                   "tags": ["cup", "spoon", "saucer", "table", "cup", "man"][:count]}
        second = photo_regions["astronaut"] if count == 3 else photo_regions["coffee"]
        items.append({"text": text, "regions": (regions, second) if task == "cmal-visual-reasoning" else regions})
    singles = [pipe(item) for item in items]
    for batched, single, item in zip(pipe(items, batch_size=3), singles, items):
        assert_same_result(batched, single)
        assert_same_result(single, expected_result(task, model, processor, item["text"], item["regions"]))


def test_top_k_ranks_answers_and_labels(processor, photo_regions):
    vqa = pipeline("cmal-vqa", model=make_model("cmal-vqa", processor), processor=processor, device=-1)
    answers = vqa(text="what color is the saucer?", regions=photo_regions["coffee"], top_k=4)
    assert len(answers) == 4 and {answer["answer"] for answer in answers} <= set(ANSWERS)
    assert [answer["score"] for answer in answers] == sorted((answer["score"] for answer in answers), reverse=True)
    assert len(vqa(text="what color?", regions=photo_regions["coffee"], top_k=100)) == len(ANSWERS)
    assert len(vqa(text="what color?", regions=photo_regions["coffee"])) == 1
    entailment = pipeline("cmal-visual-entailment", model=make_model("cmal-visual-entailment", processor),
                          processor=processor, device=-1, top_k=3)
    labels = entailment(text="the cup is empty", regions=photo_regions["coffee"])
    assert sorted(label["label"] for label in labels) == ["contradiction", "entailment", "neutral"]
    assert sum(label["score"] for label in labels) == pytest.approx(1.0, abs=1e-5)


def test_referring_expression_box_is_in_pixels_only_with_an_image_size(processor, photo_regions):
    pipe = pipeline("cmal-referring-expression", model=make_model("cmal-referring-expression", processor),
                    processor=processor, device=-1)
    with_size = pipe(text="black helmet", regions=photo_regions["astronaut"])
    index = with_size["region_index"]
    assert with_size["box"] == pytest.approx(photo_regions["astronaut"]["visual_pos"][index], abs=1e-2)
    assert not with_size["normalized"]
    width, height = photo_regions["astronaut"]["image_size"]
    normalised = {**photo_regions["astronaut"], "visual_pos": [[x1 / width, y1 / height, x2 / width, y2 / height]
                                                          for x1, y1, x2, y2 in photo_regions["astronaut"]["visual_pos"]]}
    del normalised["image_size"]
    without_size = pipe(text="black helmet", regions=normalised)
    assert without_size["normalized"] and without_size["region_index"] == index
    assert without_size["box"] == pytest.approx(normalised["visual_pos"][index], abs=1e-4)


def test_visual_reasoning_takes_a_pair_of_images_through_the_extractor(processor, tiny_detector):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    extractor = CmalRegionExtractor(AutoModelForObjectDetection.from_pretrained(tiny_detector),
                                    AutoImageProcessor.from_pretrained(tiny_detector), score_threshold=0.0, top_k=4)
    model = make_model("cmal-visual-reasoning", processor)
    pipe = pipeline("cmal-visual-reasoning", model=model, processor=processor, device=-1, region_extractor=extractor)
    rng = np.random.default_rng(0)
    left, right = (rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8) for _ in range(2))
    result = pipe(text="both images show a cup", images=(left, Image.fromarray(right)))
    expected = expected_result("cmal-visual-reasoning", model, processor, "both images show a cup",
                               (extractor(left), extractor(right)))
    assert_same_result(result, expected)


BAD_CALLS = [
    ("cmal-vqa", dict(regions="COFFEE"), "text"),
    ("cmal-vqa", dict(text="what?"), "regions"),
    ("cmal-vqa", dict(text="what?", regions="COFFEE", image="photo.png"), "image"),
    ("cmal-vqa", dict(text="what?", image="photo.png"), "region extractor"),
    ("cmal-vqa", dict(text=["what?"], regions="COFFEE"), "text"),
    ("cmal-vqa", dict(text="what?", regions=[1, 2]), "regions"),
    ("cmal-vqa", dict(text="what?", regions="COFFEE", question="what?"), "question"),
    ("cmal-vqa", dict(text="what?", regions="COFFEE", top_k=0), "top_k"),
    ("cmal-vqa", dict(inputs={"text": "what?", "regions": "COFFEE", "images": None}), "images"),
    ("cmal-vqa", dict(inputs=[]), "empty"),
    ("cmal-vqa", dict(inputs={"text": "what?", "regions": "COFFEE"}, text="what?"), "text"),
    ("cmal-referring-expression", dict(text="the cup", regions="COFFEE", top_k=2), "top_k"),
    ("cmal-visual-reasoning", dict(text="two cups", regions="COFFEE"), "regions"),
    ("cmal-visual-reasoning", dict(text="two cups", image="photo.png"), "image"),
    ("cmal-visual-reasoning", dict(text="two cups", images=("a.png", "b.png", "c.png")), "images"),
    ("cmal-image-text-matching", dict(text="a cup", regions={"visual_pos": [[0, 0, 1, 1]]}), "visual_feats"),
]


@pytest.mark.parametrize(("task", "call", "named"), BAD_CALLS)
def test_bad_inputs_raise_a_value_error_naming_the_argument(task, call, named, processor, photo_regions):
    pipe = pipeline(task, model=make_model(task, processor), processor=processor, device=-1)

    def resolve(value):
        if value == "COFFEE":
            return photo_regions["coffee"]
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        return value

    call = resolve(call)
    inputs = call.pop("inputs", None)
    with pytest.raises(ValueError, match=named):
        pipe(inputs, **call)


def test_an_image_path_that_is_not_a_file_is_named(processor, tiny_detector):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    extractor = CmalRegionExtractor(AutoModelForObjectDetection.from_pretrained(tiny_detector),
                                    AutoImageProcessor.from_pretrained(tiny_detector))
    pipe = pipeline("cmal-vqa", model=make_model("cmal-vqa", processor), processor=processor, device=-1,
                    region_extractor=extractor)
    with pytest.raises(ValueError, match="image.*missing.png"):
        pipe(text="what?", image="missing.png")


def test_a_pipeline_refuses_the_wrong_head(processor):
    with pytest.raises(ValueError, match="CmalForQuestionAnswering"):
        pipeline("cmal-vqa", model=make_model("cmal-visual-entailment", processor), processor=processor, device=-1)


# ----------------------------------------------------------------------------------------------------------------
# Bad items in a batch, bad images, heads that were not in the folder (issue 17)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["cmal-vqa", "cmal-visual-reasoning", "cmal-referring-expression"])
def test_an_item_with_narrow_features_is_refused_in_a_batch_as_alone(task, processor, photo_regions):
    """With batch_size=2 a narrow item used to be zero-padded to the model's width and scored."""
    pipe = pipeline(task, model=make_model(task, processor), processor=processor, device=-1)
    narrow = {**photo_regions["coffee"], "visual_feats": photo_regions["coffee"]["visual_feats"][:, : FEATURE_DIM - 4]}
    good_item = task_inputs(task, photo_regions)
    narrow_item = {"text": good_item["text"],
                   "regions": (narrow, narrow) if task == "cmal-visual-reasoning" else narrow}
    message = (rf"regions: visual_feats of width {FEATURE_DIM - 4}; this model expects config.visual_feat_dim = "
               rf"{FEATURE_DIM}")
    with pytest.raises(ValueError, match=message):
        pipe(narrow_item)
    with pytest.raises(ValueError, match=message):
        pipe([good_item, narrow_item], batch_size=2)
    with pytest.raises(ValueError, match=message):
        pipe([narrow_item, good_item, good_item], batch_size=3)
    assert len(pipe([good_item, good_item], batch_size=2)) == 2


@pytest.fixture(scope="module")
def image_pipelines(processor, tiny_detector):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    extractor = CmalRegionExtractor(AutoModelForObjectDetection.from_pretrained(tiny_detector),
                                    AutoImageProcessor.from_pretrained(tiny_detector), score_threshold=0.0, top_k=4)
    return {task: pipeline(task, model=make_model(task, processor), processor=processor, device=-1,
                           region_extractor=extractor) for task in ("cmal-vqa", "cmal-visual-reasoning")}


@pytest.fixture(scope="module")
def bad_image_files(tmp_path_factory):
    import io

    folder = tmp_path_factory.mktemp("bad_images")
    (folder / "notes.png").write_text("not an image, although it is called .png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return folder


BAD_IMAGES = {
    "non-image file": ("notes.png", r"image must be a PIL image, a uint8 array .* or the path of an image file; got "
                                    r"the path '.*notes.png', which PIL cannot read as an image"),
    "truncated PNG": ("truncated.png", r"image must be .*; got the path '.*truncated.png', which PIL cannot read as "
                                       r"an image \(not an image, truncated or corrupt: image file is truncated"),
    "[H, W, 5]": (np.zeros((20, 20, 5), np.uint8), r"image must be a PIL image, a uint8 array \[H, W\], \[H, W, 1\], "
                                                   r"\[H, W, 3\] or \[H, W, 4\].*; got an array of shape \(20, 20, 5\)"),
    "[H, W, 2]": (np.zeros((20, 20, 2), np.uint8), r"image must be .*; got an array of shape \(20, 20, 2\)"),
    "float array": (np.zeros((20, 20, 3), np.float32), r"image must be .*; got an array of shape \(20, 20, 3\) and "
                                                       r"dtype float32"),
    "0x0 array": (np.zeros((0, 0, 3), np.uint8), r"image must be an image of at least 1 x 1 pixels; got an array of "
                                                 r"shape \(0, 0, 3\) and dtype uint8 of 0x0 pixels"),
    "0x0 PIL": (Image.new("RGB", (0, 0)), r"image must be an image of at least 1 x 1 pixels; got a RGB PIL image of "
                                          r"0x0 pixels"),
    "2000x1": (np.zeros((1, 2000, 3), np.uint8), r"image \(an array of shape \(1, 2000, 3\) and dtype uint8, 2000x1 "
                                                 r"pixels\) cannot go through the region extractor: .*expected an image "
                                                 r"whose sides the detector's image processor can resize"),
    "1x2000": (Image.new("RGB", (1, 2000)), r"image \(a RGB PIL image, 1x2000 pixels\) cannot go through the region "
                                            r"extractor"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_is_a_value_error_naming_the_argument_the_value_and_what_is_expected(case, image_pipelines,
                                                                                          bad_image_files):
    """Each used to raise UnidentifiedImageError, OSError, TypeError, ZeroDivisionError or a detector error."""
    image, message = BAD_IMAGES[case]
    if isinstance(image, str):
        image = str(bad_image_files / image)
    with pytest.raises(ValueError, match=message):
        image_pipelines["cmal-vqa"](text="what is it?", image=image)
    # the second image of a pair is named as images[1]
    pair_message = message.replace("image must", r"images\[1\] must").replace(r"^image \(", r"images\[1\] \(")
    if pair_message.startswith(r"image \("):
        pair_message = r"images\[1\] \(" + pair_message[len(r"image \("):]
    with pytest.raises(ValueError, match=pair_message):
        image_pipelines["cmal-visual-reasoning"](text="two cups", images=(np.zeros((30, 40, 3), np.uint8), image))


@pytest.mark.parametrize("case", ["[H, W, 5]", "0x0 array", "non-image file", "2000x1"])
def test_a_bad_image_in_a_batch_is_refused_as_alone(case, image_pipelines, bad_image_files):
    image, message = BAD_IMAGES[case]
    if isinstance(image, str):
        image = str(bad_image_files / image)
    good = {"text": "what is it?", "image": np.zeros((30, 40, 3), np.uint8)}
    with pytest.raises(ValueError, match=message):
        image_pipelines["cmal-vqa"]([good, {"text": "what is it?", "image": image}], batch_size=2)


def test_one_channel_and_grey_arrays_are_accepted_as_grey_images(image_pipelines):
    grey = np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8)
    pipe = image_pipelines["cmal-vqa"]
    assert_same_result(pipe(text="what is it?", image=grey[:, :, None]), pipe(text="what is it?", image=grey))


def _pretraining_folder(processor, folder):
    from modeling_cmal import CmalForPreTraining

    torch.manual_seed(0)
    config = make_model("cmal-image-text-matching", processor).config
    CmalForPreTraining(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


# (The text-and-anchored-word task pooler, config.task_pooling's default, has no weights of its own.)
@pytest.mark.parametrize("task, head", [("cmal-vqa", "answer_head"),
                                        ("cmal-visual-entailment", "classifier"),
                                        ("cmal-visual-reasoning", "classifier"),
                                        ("cmal-referring-expression", "region_scorer")])
def test_a_pipeline_warns_when_its_head_was_not_in_the_folder(task, head, processor, tmp_path, caplog,
                                                              photo_regions):
    """A pre-training folder has no task head: the pipeline runs a random one. It says so, naming the folder."""
    folder = _pretraining_folder(processor, tmp_path / "pretrained")
    with caplog.at_level("WARNING", logger="modeling_cmal.pipelines_cmal"):
        pipe = pipeline(task, model=folder, device=-1)
    warnings = [record.getMessage() for record in caplog.records if record.name == "modeling_cmal.pipelines_cmal"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{task}: the folder {folder!r} has no weights for the ")
    assert f" head {head} (" in warnings[0] and "the head was not in the folder" in warnings[0]
    assert "initialised at random" in warnings[0]
    pipe(**task_inputs(task, photo_regions))  # a warning, not a refusal


def test_no_warning_for_image_text_matching_from_pre_training_or_a_fine_tuned_folder(processor, tmp_path, caplog):
    pretrained = _pretraining_folder(processor, tmp_path / "pretrained")
    fine_tuned = tmp_path / "vqa"
    make_model("cmal-vqa", processor).save_pretrained(fine_tuned)
    processor.save_pretrained(fine_tuned)
    with caplog.at_level("WARNING", logger="modeling_cmal.pipelines_cmal"):
        pipeline("cmal-image-text-matching", model=pretrained, device=-1)  # its itm_head is pre-trained
        pipeline("cmal-vqa", model=str(fine_tuned), device=-1)
        pipeline("cmal-vqa", model=make_model("cmal-vqa", processor), processor=processor, device=-1)  # in memory
    assert not [record for record in caplog.records if record.name == "modeling_cmal.pipelines_cmal"]


# ----------------------------------------------------------------------------------------------------------------
# Folders without a processor, captions longer than the model's positions (issue 17)
# ----------------------------------------------------------------------------------------------------------------


def test_a_model_folder_without_tokenizer_files_is_named(processor, tmp_path):
    """Used to end in "You need to have sentencepiece or tiktoken installed" from the tokenizer loader."""
    folder = tmp_path / "model_only"
    make_model("cmal-vqa", processor).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path '.*model_only' holds no tokenizer files "
                                         r"\(none of tokenizer.json, vocab.txt"):
        pipeline("cmal-vqa", model=str(folder), device=-1)
    processor.save_pretrained(folder)
    assert pipeline("cmal-vqa", model=str(folder), device=-1)(text="a cup?", regions={
        "visual_feats": np.zeros((2, FEATURE_DIM), np.float32), "visual_pos": [[0, 0, 0.5, 0.5]] * 2, "tags": ["cup", "dog"]})


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_caption_longer_than_the_models_positions_is_cut_there_with_a_warning(batch_size, processor, photo_regions,
                                                                                caplog):
    pipe = pipeline("cmal-vqa", model=make_model("cmal-vqa", processor, max_position_embeddings=16),
                    processor=processor, device=-1)
    long_question = "is there " + "a very small and " * 6 + "red cup?"
    items = [{"text": long_question, "regions": photo_regions["coffee"]}, {"text": "a cup?",
                                                                           "regions": photo_regions["coffee"]}]
    with caplog.at_level("WARNING", logger="modeling_cmal"):
        results = pipe(items, batch_size=batch_size)
    assert len(results) == 2
    assert "1 of 1 captions are longer than 16 pieces (max_length, special tokens included) and were cut" in \
        caplog.text and "anchors (words past the cut, or cut in part) are lost" in caplog.text
