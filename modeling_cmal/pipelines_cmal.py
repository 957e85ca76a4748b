"""Custom `transformers` pipelines for the CMAL task heads.

transformers 5 reserves (and refuses) its own task names such as `visual-question-answering` for its own pipeline
classes, so CMAL registers five tasks of its own:

| task | head | call | returns |
|---|---|---|---|
| `cmal-vqa` | `CmalForQuestionAnswering` | `text` (question) + `image` or `regions` | top_k `{"answer", "score"}` |
| `cmal-visual-entailment` | `CmalForVisualEntailment` | `text` (hypothesis) + `image` or `regions` | top_k `{"label", "score"}` |
| `cmal-visual-reasoning` | `CmalForVisualReasoning` | `text` (sentence) + `images` or `regions` (a pair) | `{"label", "score"}` |
| `cmal-referring-expression` | `CmalForReferringExpression` | `text` (expression) + `image` or `regions` | `{"box", "score", ...}` |
| `cmal-image-text-matching` | `CmalForImageTextMatching` | `text` (sentence) + `image` or `regions` | `{"match_probability", ...}` |

Importing this module registers the five tasks with `transformers.pipelines.PIPELINE_REGISTRY` (in-process use,
`pipeline("cmal-vqa", model=folder)`); a folder written by `cmal_examples.hub_export.write_hub_folder` lists them under
`custom_pipelines` in its config, so `pipeline("cmal-vqa", model=folder, trust_remote_code=True)` works where this
package is not installed. Inputs are keywords (`pipe(text=..., regions=...)`), a dict with the same keys, or a list
of such dicts (a list of results comes back; `batch_size=` batches them through the model).

`regions` is the processor's per-image dict: `visual_feats` `[M, Dv]`, `visual_pos` `[M, 4]` (`x1, y1, x2, y2`,
pixels with `image_size` `(width, height)` or normalised to `[0, 1]` without it), `tags` `[M]`, optional `scores`
`[M]`.
`image` (a PIL image, a numpy `[H, W, 3]` uint8 array or a path) needs a region extractor (`CmalRegionExtractor`
around a transformers object detector): pass one when building the pipeline (`pipeline(..., region_extractor=
extractor)`), or pass a processor that has one. The processor does not save its extractor, so a pipeline loaded
from a folder needs `region_extractor=` for images.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling_cmal import CmalForImageTextMatching, CmalForReferringExpression, CmalForVisualReasoning
from .region_extraction import describe_image, load_rgb_image

# What the task heads' forward takes from the processor's output. `anchor_actions` is left out on purpose: at
# inference the model applies `config.default_anchor_action` to every anchor.
MODEL_INPUT_NAMES = (
    "input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask",
    "anchor_pairs", "anchor_concept_ids",
)
# Padding of each model input when items of different lengths are batched (`batch_size > 1`); 0 for the rest.
INPUT_PADDING = {"anchor_pairs": -1, "anchor_concept_ids": -1}
IMAGE_SIZE_KEY = "image_size"

logger = logging.getLogger(__name__)


def _saved_weight_names(folder) -> set[str] | None:
    """Names of the tensors in a model folder's safetensors weights (one file or a sharded index), None when the
    folder (a local path or a Hub id already in the cache) has none that can be read."""
    from huggingface_hub import try_to_load_from_cache

    def find(name):
        if os.path.isdir(folder):
            path = os.path.join(folder, name)
            return path if os.path.isfile(path) else None
        try:
            path = try_to_load_from_cache(str(folder), name)
        except Exception:  # an id that is neither a folder nor cached: nothing to compare with
            return None
        return path if isinstance(path, str) else None  # not cached, or cached as missing

    try:
        index = find("model.safetensors.index.json")
        if index:
            with open(index) as handle:
                return set(json.load(handle)["weight_map"])
        weights = find("model.safetensors")
        if not weights:
            return None
        # The safetensors header (8-byte little-endian length, then JSON) read by hand: remote code imports torch,
        # transformers, numpy and Pillow only (the programs use `safe_open`, cmal_examples.checkpoints).
        with open(weights, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        return {name for name in header if name != "__metadata__"}
    except Exception:  # an unreadable file is from_pretrained's to report; this is only a warning
        return None


def _pad_to(tensor: torch.Tensor, shape: Sequence[int], value) -> torch.Tensor:
    """Pads `tensor` at the end of every dimension up to `shape`."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    padded = tensor.new_full(tuple(shape), value)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return padded


class CmalPipeline(Pipeline):
    """What the five CMAL pipelines share: keyword inputs and their checks, the processor, batching with CMAL's
    padding, and the forward pass. Subclasses name their task, head and outputs."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    task_name: str
    head_class_name: str
    auto_class_name: str
    # Input keys a call takes besides `text`: one image (`image` or `regions`), or a pair for visual reasoning.
    visual_input_names: tuple[str, str] = ("image", "regions")
    ranks_labels = False

    def __init__(self, model, *args, region_extractor=None, **kwargs):
        if type(model).__name__ == "CmalModel" and self.head_class_name in _HEADS_LOADED_FROM_THE_TRUNK:
            model = self._load_head(model)
        super().__init__(model, *args, **kwargs)
        if self.processor is None or not callable(self.processor):
            raise ValueError(f"{self.task_name} needs a CmalProcessor: pass processor= or a folder saved with one")
        if type(self.model).__name__ != self.head_class_name:
            raise ValueError(
                f"{self.task_name} needs a {self.head_class_name} model, got {type(self.model).__name__}; load the "
                f"folder with pipeline({self.task_name!r}, model=folder) or {self.auto_class_name}.from_pretrained"
            )
        self.model.eval()
        # Kept on the pipeline, so that the caller's processor is left as it was.
        if region_extractor is None:
            region_extractor = getattr(self.processor, "region_extractor", None)
        self.region_extractor = region_extractor
        self._warn_about_weights_not_in_the_folder()

    def _load_head(self, trunk):
        """The head of a task that has no transformers Auto class: a folder's `custom_pipelines` entry loads the
        trunk through `AutoModel`, and the head comes from the same folder."""
        source = trunk.config._name_or_path
        if not source:
            raise ValueError(f"{self.task_name} needs a {self.head_class_name} model; got a CmalModel that was not "
                             f"loaded from a folder. Pass the {self.head_class_name} model itself")
        head_class = _HEADS_LOADED_FROM_THE_TRUNK[self.head_class_name]
        return head_class.from_pretrained(source, dtype=trunk.dtype).to(trunk.device)

    def _warn_about_weights_not_in_the_folder(self) -> None:
        """A head whose weights were not in the folder the model came from was initialised at random: its answers
        are random however confident they look (a pre-training folder has no task head; image-text matching is
        the exception, its `itm_head` is pre-trained). Says so in a warning naming the folder and the weights."""
        folder = getattr(self.model.config, "_name_or_path", None) or getattr(self.model, "name_or_path", None)
        saved = _saved_weight_names(folder) if folder else None
        if saved is None:  # built in memory, or no readable weight file: nothing to compare with
            return
        prefix = f"{self.model.base_model_prefix}."
        saved |= {prefix + name for name in saved if not name.startswith(prefix)}
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        missing = sorted(name for name in self.model.state_dict() if name not in saved and name not in tied)
        if missing:
            head = sorted({name.split(".")[0] for name in missing if not name.startswith(prefix)})
            part = f"head {', '.join(head)}" if head else "weights"
            logger.warning(
                f"{self.task_name}: the folder {folder!r} has no weights for the {type(self.model).__name__} {part} "
                f"({len(missing)} tensors, e.g. {', '.join(missing[:3])}): the head was not in the folder and was "
                "initialised at random, so the answers of this pipeline are random, however confident their scores "
                "look. Load a folder fine-tuned for this task (examples/finetune_*.py); from a pre-training folder "
                "only cmal-image-text-matching is meaningful."
            )

    # ---------------------------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------------------------

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("text", *self.visual_input_names)

    def __call__(self, inputs=None, **kwargs):
        """`pipe(text=..., image=... | regions=...)`, `pipe({"text": ..., ...})`, `pipe([{...}, {...}])` (a list of
        results), or `pipe("a question", regions=...)`. Other keywords: `top_k` where labels are ranked,
        `batch_size`, `num_workers`."""
        keyword_inputs = {name: kwargs.pop(name) for name in self.input_names if name in kwargs}
        if isinstance(inputs, str):
            inputs = {"text": inputs, **keyword_inputs}
        elif inputs is None:
            if not keyword_inputs:
                raise ValueError(f"{self.task_name} needs inputs: {self._usage()}")
            inputs = keyword_inputs
        elif keyword_inputs:
            raise ValueError(f"give the inputs either as keywords ({', '.join(keyword_inputs)}) or as the first "
                             "argument (a dict or a list of dicts), not both")
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list):
            if not inputs:
                raise ValueError(f"inputs is an empty list; {self._usage()}")
            for item in inputs:
                self._check_item(item)
        elif isinstance(inputs, Mapping):
            self._check_item(inputs)
        return super().__call__(inputs, **kwargs)

    def _usage(self) -> str:
        first, second = self.visual_input_names
        return f"text= with {first}= or {second}= (or a dict with those keys, or a list of such dicts)"

    def _check_item(self, item) -> None:
        """Raises `ValueError` naming the argument that is missing, unexpected or of the wrong kind."""
        if not isinstance(item, Mapping):
            raise ValueError(f"each input must be a dict with {self._usage()}, got {type(item).__name__}")
        unexpected = sorted(set(item) - set(self.input_names))
        if unexpected:
            raise ValueError(f"unexpected input {', '.join(map(repr, unexpected))} for {self.task_name}; it takes "
                             f"{', '.join(self.input_names)}")
        text = item.get("text")
        if text is None:
            raise ValueError(f"text is required: {self._usage()}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty string, got {text!r}")
        first, second = self.visual_input_names
        given = [name for name in self.visual_input_names if item.get(name) is not None]
        if not given:
            raise ValueError(f"{self.task_name} needs {first}= or {second}=")
        if len(given) == 2:
            raise ValueError(f"give either {first}= or {second}=, not both")
        self._check_visual_input(given[0], item[given[0]])

    def _check_visual_input(self, name: str, value) -> None:
        if name == "regions" and not isinstance(value, Mapping):
            raise ValueError(f"regions must be a dict with visual_feats, visual_pos and tags (one image), got "
                             f"{type(value).__name__}")
        if name == "image":
            self._check_region_extractor(name)

    def _check_region_extractor(self, name: str) -> None:
        if self.region_extractor is None:
            raise ValueError(
                f"{name}= needs a region extractor: build the pipeline with region_extractor=CmalRegionExtractor(...) "
                "or pass regions= (visual_feats, visual_pos, tags of each image)"
            )

    def _sanitize_parameters(self, top_k=None, **unexpected):
        if unexpected:
            raise ValueError(f"unexpected argument {', '.join(map(repr, sorted(unexpected)))} for {self.task_name}")
        postprocess_params = {}
        if top_k is not None:
            if not self.ranks_labels:
                raise ValueError(f"top_k applies to cmal-vqa and cmal-visual-entailment, not {self.task_name}")
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
            postprocess_params["top_k"] = top_k
        return {}, {}, postprocess_params

    # ---------------------------------------------------------------------------------------------------------
    # Processing
    # ---------------------------------------------------------------------------------------------------------

    def _detect(self, images: list, argument: str) -> list[dict]:
        """Regions dicts (pixel boxes with `image_size`) of `images` through the region extractor, one image at a
        time, so that an image the detector cannot take is named (`image`, or `images[i]` for a pair)."""
        regions = []
        for index, image in enumerate(images):
            name = argument if len(images) == 1 and argument == "image" else f"{argument}[{index}]"
            rgb = load_rgb_image(image, name)
            try:
                regions.append(self.region_extractor([rgb])[0])
            except ValueError as error:
                raise ValueError(f"{name} ({describe_image(image)}, {rgb.width}x{rgb.height} pixels) cannot go "
                                 f"through the region extractor: {error}") from error
        return regions

    def _encode(self, texts: list[str], regions: list[dict]) -> dict:
        # Cut where the model's positions end (the processor warns, naming the pieces and anchors lost).
        max_length = min(self.processor.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        encoding = self.processor(text=texts, regions=regions, max_length=max_length, return_tensors="pt")
        return {name: encoding[name] for name in MODEL_INPUT_NAMES if name in encoding}

    def _check_feature_width(self, model_inputs: dict, argument: str) -> None:
        """Each item's features must have the model's width: checked per item, so that a batch (which pads every
        axis) refuses a narrow item exactly as a call with that item alone does."""
        expected = self.model.config.visual_feat_dim
        width = model_inputs["visual_feats"].shape[-1]
        if width != expected:
            source = "the region extractor gives visual_feats" if argument in ("image", "images") else "visual_feats"
            raise ValueError(f"{argument}: {source} of width {width}; this model expects config.visual_feat_dim = "
                             f"{expected} (visual_feats [M, {expected}])")

    def preprocess(self, item) -> dict:
        self._check_item(item)
        argument = "image" if item.get("image") is not None else "regions"
        regions = self._detect([item["image"]], "image")[0] if argument == "image" else item["regions"]
        model_inputs = self._encode([item["text"]], [regions])
        self._check_feature_width(model_inputs, argument)
        image_size = regions.get("image_size")
        model_inputs[IMAGE_SIZE_KEY] = None if image_size is None else tuple(float(value) for value in image_size)
        return model_inputs

    def _forward(self, model_inputs: dict) -> dict:
        tensors = {name: value for name, value in model_inputs.items() if name in MODEL_INPUT_NAMES}
        logits = self.model(**tensors).logits
        extras = {name: value for name, value in model_inputs.items() if name not in MODEL_INPUT_NAMES}
        return {"logits": logits, **extras}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        if batch_size == 1:
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)
        # transformers' default collator pads along one axis with 0; CMAL needs -1 anchor padding and, for visual
        # reasoning, padding along the region axis of each image.
        from torch.utils.data import DataLoader
        from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        dataloader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        model_iterator = PipelineIterator(dataloader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _collate(self, items: list[dict]) -> dict:
        pad_token_id = getattr(self.processor.tokenizer, "pad_token_id", None) or 0
        batch = {}
        for name in items[0]:
            values = [item[name] for item in items]
            if not isinstance(values[0], torch.Tensor):
                batch[name] = values
                continue
            shape = [max(sizes) for sizes in zip(*(value.shape for value in values))]
            if name in ("visual_feats", "visual_pos") and len({tensor.shape[-1] for tensor in values}) > 1:
                # never zero-pad the feature axis: preprocess refuses such an item; this guards custom preprocessing
                raise ValueError(f"{name} of the batch items have different widths "
                                 f"{[tensor.shape[-1] for tensor in values]}; expected one width")
            value = pad_token_id if name == "input_ids" else INPUT_PADDING.get(name, 0)
            batch[name] = torch.cat([_pad_to(tensor, [tensor.shape[0], *shape[1:]], value) for tensor in values])
        return batch

    def save_pretrained(self, save_directory, **kwargs):
        """Saves model, config (with this task under `custom_pipelines`), code and processor, so that the folder
        loads with `pipeline(model=save_directory, trust_remote_code=True)`. For a Hub-ready folder with a model
        card use `cmal_examples.hub_export.write_hub_folder` (`examples/cmal_examples/hub_export.py`)."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


class CmalVisualQuestionAnsweringPipeline(CmalPipeline):
    """`cmal-vqa`: `pipe(text="what color is the cup?", regions=...)` → `[{"answer": "red", "score": 0.93}, ...]`,
    the `top_k` (default 1) answers of `config.id2label` by sigmoid score (VQA heads are trained with soft-score
    binary cross-entropy, so scores do not sum to 1)."""

    task_name = "cmal-vqa"
    head_class_name = "CmalForQuestionAnswering"
    auto_class_name = "AutoModelForVisualQuestionAnswering"
    ranks_labels = True

    def postprocess(self, model_outputs: dict, top_k: int = 1) -> list[dict]:
        scores = model_outputs["logits"][0].float().sigmoid()
        values, indices = scores.topk(min(top_k, scores.shape[-1]))
        id2label = self.model.config.id2label
        return [{"answer": id2label[index], "score": value} for value, index in zip(values.tolist(), indices.tolist())]


class CmalVisualEntailmentPipeline(CmalPipeline):
    """`cmal-visual-entailment`: `pipe(text=hypothesis, regions=...)` → `[{"label": "entailment", "score": 0.8}]`,
    the `top_k` (default 1) labels of `config.id2label` by softmax probability."""

    task_name = "cmal-visual-entailment"
    head_class_name = "CmalForVisualEntailment"
    auto_class_name = "AutoModelForSequenceClassification"
    ranks_labels = True

    def postprocess(self, model_outputs: dict, top_k: int = 1) -> list[dict]:
        probabilities = model_outputs["logits"][0].float().softmax(-1)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[-1]))
        id2label = self.model.config.id2label
        return [{"label": id2label[index], "score": value} for value, index in zip(values.tolist(), indices.tolist())]


class CmalVisualReasoningPipeline(CmalPipeline):
    """`cmal-visual-reasoning` (NLVR2): one sentence about two images, `pipe(text=..., images=(left, right))` or
    `pipe(text=..., regions=(left_regions, right_regions))` → `{"label": ..., "score": ...}` (the most probable of
    `config.id2label`, softmax probability).

    NLVR2 has no transformers Auto class: a folder's `custom_pipelines` entry loads the trunk through `AutoModel`,
    and the pipeline then loads the `CmalForVisualReasoning` head from the same folder.
    """

    task_name = "cmal-visual-reasoning"
    head_class_name = "CmalForVisualReasoning"
    auto_class_name = "AutoModel"
    visual_input_names = ("images", "regions")

    def _check_visual_input(self, name: str, value) -> None:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(f"{name} must be a pair (left, right) for cmal-visual-reasoning, got "
                             f"{type(value).__name__}{'' if not isinstance(value, Sequence) else f' of {len(value)}'}")
        if name == "regions" and not all(isinstance(regions, Mapping) for regions in value):
            raise ValueError("regions must be a pair of dicts with visual_feats, visual_pos and tags")
        if name == "images":
            self._check_region_extractor(name)

    def preprocess(self, item) -> dict:
        self._check_item(item)
        argument = "images" if item.get("images") is not None else "regions"
        regions = self._detect(item["images"], "images") if argument == "images" else list(item["regions"])
        encoding = self._encode([item["text"]] * 2, regions)
        self._check_feature_width(encoding, argument)
        # Both rows carry the same text; the image inputs get an image axis: [2, ...] → [1, 2, ...].
        return {name: value[:1] if name in ("input_ids", "attention_mask", "token_type_ids") else value.unsqueeze(0)
                for name, value in encoding.items()}

    def postprocess(self, model_outputs: dict) -> dict:
        probabilities = model_outputs["logits"][0].float().softmax(-1)
        score, index = probabilities.max(-1)
        return {"label": self.model.config.id2label[index.item()], "score": score.item()}


class CmalReferringExpressionPipeline(CmalPipeline):
    """`cmal-referring-expression`: `pipe(text="the red cup", regions=...)` → the region the expression refers to:
    `{"box": [x1, y1, x2, y2], "score": p, "region_index": i, "normalized": bool}`. The box is in pixels when the
    image size is known (`image=`, or `regions` with `image_size`), otherwise normalised to `[0, 1]`;
    `region_index` indexes the regions the processor kept; `score` is the softmax over those regions."""

    task_name = "cmal-referring-expression"
    head_class_name = "CmalForReferringExpression"
    auto_class_name = "AutoModel"  # no fitting Auto class: the trunk, then the head from the same folder

    def _forward(self, model_inputs: dict) -> dict:
        outputs = super()._forward(model_inputs)
        outputs["visual_pos"] = model_inputs["visual_pos"]
        outputs["visual_attention_mask"] = model_inputs["visual_attention_mask"]
        return outputs

    def postprocess(self, model_outputs: dict) -> dict:
        real = model_outputs["visual_attention_mask"][0].bool()
        if not real.any():
            raise ValueError("cmal-referring-expression got an image without regions: nothing to point at")
        logits = model_outputs["logits"][0].float().masked_fill(~real, float("-inf"))
        score, index = logits.softmax(-1).max(-1)
        box = model_outputs["visual_pos"][0, index].float()
        image_size = model_outputs[IMAGE_SIZE_KEY]
        if image_size is not None:
            width, height = image_size
            box = box * torch.tensor([width, height, width, height], dtype=box.dtype)
        return {"box": [round(value, 4) for value in box.tolist()], "score": score.item(),
                "region_index": index.item(), "normalized": image_size is None}


class CmalImageTextMatchingPipeline(CmalPipeline):
    """`cmal-image-text-matching`: `pipe(text=caption, regions=...)` → `{"match_probability": p, "is_match": p >= 0.5}`
    from the ITM head (a pre-trained folder gives it zero-shot)."""

    task_name = "cmal-image-text-matching"
    head_class_name = "CmalForImageTextMatching"
    auto_class_name = "AutoModel"  # no fitting Auto class: the trunk, then the head from the same folder

    def postprocess(self, model_outputs: dict) -> dict:
        probability = model_outputs["logits"][0].float().softmax(-1)[1].item()
        return {"match_probability": probability, "is_match": probability >= 0.5}


# The heads that fit no Auto class transformers uses for its vision-language models (see CMAL_AUTO_MAP).
_HEADS_LOADED_FROM_THE_TRUNK = {head.__name__: head for head in (CmalForVisualReasoning, CmalForReferringExpression,
                                                                 CmalForImageTextMatching)}

CMAL_PIPELINES: dict[str, type[CmalPipeline]] = {
    pipeline_class.task_name: pipeline_class
    for pipeline_class in (CmalVisualQuestionAnsweringPipeline, CmalVisualEntailmentPipeline,
                           CmalVisualReasoningPipeline, CmalReferringExpressionPipeline, CmalImageTextMatchingPipeline)
}


def custom_pipelines_entry(task: str) -> dict:
    """The `config.custom_pipelines[task]` entry that lets `pipeline(task, model=folder, trust_remote_code=True)`
    find this module's class in a saved folder (`pt` names a transformers Auto class, as transformers requires)."""
    if task not in CMAL_PIPELINES:
        raise ValueError(f"task must be one of {sorted(CMAL_PIPELINES)}, got {task!r}")
    pipeline_class = CMAL_PIPELINES[task]
    return {"impl": f"{__name__.rsplit('.', 1)[-1]}.{pipeline_class.__name__}",
            "pt": [pipeline_class.auto_class_name], "type": "multimodal"}


def _auto_class(pipeline_class: type[CmalPipeline]) -> type:
    import transformers

    return getattr(transformers, pipeline_class.auto_class_name)


def register_cmal_pipelines() -> None:
    """Registers the five tasks with `PIPELINE_REGISTRY` (in-process `pipeline("cmal-vqa", model=...)`)."""
    for task, pipeline_class in CMAL_PIPELINES.items():
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=_auto_class(pipeline_class),
                                            type="multimodal")


# Imported as remote code from a model folder, this module leaves the process-wide registry alone (a downloaded
# folder should not redefine tasks for the whole process); `_registered_impl`, which `Pipeline.save_pretrained`
# reads to write `custom_pipelines`, is set all the same.
if __name__.startswith("transformers_modules"):
    for _task, _pipeline_class in CMAL_PIPELINES.items():
        _pipeline_class._registered_impl = {
            _task: {"impl": _pipeline_class, "pt": (_auto_class(_pipeline_class),), "type": "multimodal"}
        }
else:
    register_cmal_pipelines()


__all__ = [
    "CMAL_PIPELINES",
    "CmalImageTextMatchingPipeline",
    "CmalPipeline",
    "CmalReferringExpressionPipeline",
    "CmalVisualEntailmentPipeline",
    "CmalVisualQuestionAnsweringPipeline",
    "CmalVisualReasoningPipeline",
    "custom_pipelines_entry",
    "register_cmal_pipelines",
]
