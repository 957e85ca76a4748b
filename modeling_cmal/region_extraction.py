"""CmalRegionExtractor: images → the `regions` dicts of `CmalProcessor`, through a transformers object detector.

Any DETR-family detector of transformers works (DETR, Conditional / Deformable DETR, YOLOS, RT-DETR, Table
Transformer, ...): the feature of a detection is the hidden state of the decoder query that produced it, the
last `Q` positions of `outputs.last_hidden_state` (`Q` = the number of queries, `outputs.logits.shape[1]`; YOLOS
puts its detection tokens last). Boxes, labels and scores come from the image processor's
`post_process_object_detection` (asked for every candidate), whose detections are traced back to their queries
by box; `score_threshold` and `top_k` are then applied.

Remote code: this module imports only the standard library, numpy, PIL, torch and transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import center_to_corners_format

from .anchoring import _shorten


IMAGE_EXPECTED = "a PIL image, a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], or the path of an image file"


def describe_image(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"the path {os.fspath(image)!r}"
    if isinstance(image, np.ndarray):
        return f"an array of shape {tuple(image.shape)} and dtype {image.dtype}"
    if isinstance(image, Image.Image):
        return f"a {image.mode} PIL image"
    return type(image).__name__


def load_rgb_image(image, argument: str) -> Image.Image:
    """The one image loader of the package (the extractor, the pipelines, the corpus builders and the programs).

    A PIL image, a numpy uint8 array (`[H, W]`, `[H, W, 1]`, `[H, W, 3]`, `[H, W, 4]`) or a path → an RGB PIL
    image of at least 1 x 1 pixels; anything else is a `ValueError` naming `argument`, the value and what is
    expected. (`transformers.image_utils.load_image` also fetches URLs, which a run without network must not
    try, and its errors name no argument.)"""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ValueError(f"{argument} must be {IMAGE_EXPECTED}; got {describe_image(image)}, which is not a file")
        try:
            with Image.open(image) as opened:
                rgb = opened.convert("RGB")  # decodes the whole file: a truncated one fails here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"{argument} must be {IMAGE_EXPECTED}; got {describe_image(image)}, which PIL cannot "
                             f"read as an image (not an image, truncated or corrupt: {error})") from None
    elif isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        rgb = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image).convert("RGB")
    else:
        raise ValueError(f"{argument} must be {IMAGE_EXPECTED}; got {describe_image(image)}")
    if rgb.width < 1 or rgb.height < 1:
        raise ValueError(f"{argument} must be an image of at least 1 x 1 pixels; got {describe_image(image)} of "
                         f"{rgb.width}x{rgb.height} pixels")
    return rgb


# What an image processor or detector raises for an image it cannot take (too small or too elongated to resize,
# smaller than a convolution kernel, ...).
_DETECTOR_INPUT_ERRORS = (ValueError, RuntimeError, ZeroDivisionError, IndexError, TypeError)


class CmalRegionExtractor:
    """Detects regions with a transformers object-detection model and describes them as `CmalProcessor` wants.

    Args:
        model: an object-detection model (`AutoModelForObjectDetection`) whose outputs carry `logits`
            `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` (normalised centre format) and `last_hidden_state` ending with
            the `Q` query states; its `config.id2label` names the tags.
        image_processor: the model's image processor, with `post_process_object_detection`.
        score_threshold (`float`, defaults to 0.2): detections scoring at most this are dropped.
        top_k (`int`, defaults to 36): at most this many detections per image, highest scores first.
        batch_size (`int`, defaults to 8): images per forward pass.

    Calling it with one image (a PIL image, a uint8 array or the path of an image file) gives one dict, with a
    list a list of dicts:
    `visual_feats` float32 `[K, D]` (D = the detector's hidden size), `visual_pos` float32 `[K, 4]` (x1, y1, x2, y2
    in pixels, clipped to the image), `image_size` `(width, height)`, `tags` (K class names), `scores` float32 `[K]`,
    sorted by score. `CmalProcessor(..., region_extractor=extractor)` runs it for `processor(images=...)`.
    """

    def __init__(self, model, image_processor, *, score_threshold: float = 0.2, top_k: int = 36, batch_size: int = 8):
        if not isinstance(model, torch.nn.Module) or not isinstance(getattr(getattr(model, "config", None),
                                                                            "id2label", None), dict):
            raise ValueError(f"model must be a transformers object-detection model with config.id2label, got "
                             f"{type(model).__name__}")
        if not callable(getattr(image_processor, "post_process_object_detection", None)):
            raise ValueError(f"image_processor must be an object-detection image processor with "
                             f"post_process_object_detection, got {type(image_processor).__name__}")
        if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) or \
                not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"score_threshold must be a float in [0, 1), got {_shorten(score_threshold)}")
        for name, value in (("top_k", top_k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {_shorten(value)}")
        self.model = model.eval()
        self.image_processor = image_processor
        self.score_threshold = float(score_threshold)
        self.top_k = top_k
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, score_threshold: float = 0.2, top_k: int = 36,
                        batch_size: int = 8, **kwargs) -> CmalRegionExtractor:
        """Loads a detector and its image processor (`AutoModelForObjectDetection`, `AutoImageProcessor`); other
        keyword arguments go to both `from_pretrained` calls."""
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        model = AutoModelForObjectDetection.from_pretrained(pretrained_model_name_or_path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(model, image_processor, score_threshold=score_threshold, top_k=top_k, batch_size=batch_size)

    @property
    def feature_dim(self) -> int:
        """D, the size of the features (the detector's hidden size)."""
        config = self.model.config
        return getattr(config, "d_model", None) or config.hidden_size

    def __call__(self, images):
        single = isinstance(images, (Image.Image, np.ndarray, str, os.PathLike))
        image_list = [images] if single else images
        if not isinstance(image_list, Sequence) or isinstance(image_list, bytes) or not image_list:
            raise ValueError(f"images must be an image or a non-empty list of images, got {_shorten(images)}")
        rgb_images = [load_rgb_image(image, f"images[{index}]") for index, image in enumerate(image_list)]
        regions = []
        for start in range(0, len(rgb_images), self.batch_size):
            regions.extend(self._detect(rgb_images[start: start + self.batch_size], start))
        return regions[0] if single else regions

    def _run_detector(self, images: list[Image.Image]):
        inputs = self.image_processor(images=images, return_tensors="pt").to(self.model.device, dtype=self.model.dtype)
        return self.model(**inputs)

    def _run_detector_naming_the_image(self, images: list[Image.Image], start: int):
        """The detector's outputs; an image it cannot take is a `ValueError` naming it (`images[i]`, its size)."""
        try:
            return self._run_detector(images)
        except _DETECTOR_INPUT_ERRORS as error:
            failed = 0
            if len(images) > 1:  # find the image: run each alone
                failed = None
                for offset, image in enumerate(images):
                    try:
                        self._run_detector([image])
                    except _DETECTOR_INPUT_ERRORS as single_error:
                        failed, error = offset, single_error
                        break
                if failed is None:  # every image goes through alone: not an image's fault
                    raise
            image = images[failed]
            raise ValueError(
                f"images[{start + failed}] of {image.width}x{image.height} pixels cannot go through the detector "
                f"({type(self.image_processor).__name__} + {type(self.model).__name__}: {type(error).__name__}: "
                f"{str(error).strip()[:300]}); expected an image whose sides the detector's image processor can "
                "resize (this one is too small or too elongated for it)"
            ) from error

    @torch.no_grad()
    def _detect(self, images: list[Image.Image], start: int = 0) -> list[dict]:
        outputs = self._run_detector_naming_the_image(images, start)
        for name in ("logits", "pred_boxes", "last_hidden_state"):
            if getattr(outputs, name, None) is None:
                raise ValueError(f"{type(self.model).__name__} outputs have no {name}; CmalRegionExtractor needs a "
                                 "DETR-family detector (query states in last_hidden_state, pred_boxes, logits)")
        num_queries = outputs.logits.shape[1]
        if outputs.last_hidden_state.shape[1] < num_queries:
            raise ValueError(f"{type(self.model).__name__} last_hidden_state has {outputs.last_hidden_state.shape[1]} "
                             f"positions for {num_queries} queries; expected the query states at its end")
        query_states = outputs.last_hidden_state[:, -num_queries:].float()
        target_sizes = torch.tensor([(image.height, image.width) for image in images])
        # Every candidate (scores are probabilities, all above -1); the threshold and top_k are applied below.
        detections = self.image_processor.post_process_object_detection(
            outputs, threshold=-1.0, target_sizes=target_sizes
        )
        id2label = self.model.config.id2label
        regions = []
        for index, (image, detected) in enumerate(zip(images, detections)):
            width, height = image.size
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            boxes = detected["boxes"].float().cpu()
            query_boxes = center_to_corners_format(outputs.pred_boxes[index].float().cpu()) * scale
            queries = self._trace_queries(boxes, query_boxes)
            scores = detected["scores"].float().cpu()
            kept = torch.nonzero(scores > self.score_threshold).flatten()
            order = kept[torch.argsort(-scores[kept], stable=True)][: self.top_k]
            regions.append({
                "visual_feats": query_states[index, queries[order]].cpu().numpy(),
                "visual_pos": torch.minimum(boxes[order].clamp(min=0), scale).numpy(),
                "image_size": (width, height),
                "tags": [id2label[int(label)] for label in detected["labels"][order].tolist()],
                "scores": scores[order].numpy(),
            })
        return regions

    @staticmethod
    def _trace_queries(boxes: torch.Tensor, query_boxes: torch.Tensor) -> torch.Tensor:
        """The query of each detection, found by its box (converted as the post-processing converts it).

        DETR-style post-processing keeps one detection per query, in query order: then detection i is query i
        (kept as such even where an untrained model gives several queries the same box). Otherwise (top-k
        post-processing over queries x classes) each detection takes the query of the nearest box; among equally
        near ones the first not yet taken.
        """
        distances = (boxes[:, None, :] - query_boxes[None, :, :]).abs().sum(-1)
        if boxes.shape[0] == query_boxes.shape[0] and (distances.diagonal() == distances.min(dim=1).values).all():
            return torch.arange(boxes.shape[0])
        taken: set[int] = set()
        queries = []
        for row in distances:
            nearest = torch.nonzero(row == row.min()).flatten().tolist()
            query = next((candidate for candidate in nearest if candidate not in taken), nearest[0])
            taken.add(query)
            queries.append(query)
        return torch.tensor(queries, dtype=torch.long)


__all__ = ["CmalRegionExtractor"]
