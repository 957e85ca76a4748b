"""Tests of CmalRegionExtractor (modeling_cmal/region_extraction.py) on tiny randomly initialised DETR-family
detectors built from configs (no downloads, no timm, no torchvision), on real photos from scikit-image."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_cmal.processing_cmal import CmalProcessor
from modeling_cmal.region_extraction import CmalRegionExtractor

LABELS = ["cup", "saucer", "spoon", "woman", "helmet"]


def _labels() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {name: index for index, name in enumerate(LABELS)}}


@pytest.fixture(scope="module")
def yolos():
    from transformers import YolosConfig, YolosForObjectDetection
    from transformers.models.yolos.image_processing_pil_yolos import YolosImageProcessorPil

    torch.manual_seed(0)
    config = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=[64, 96], patch_size=16, num_detection_tokens=10, **_labels())
    model = YolosForObjectDetection(config).eval()
    return model, YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})


@pytest.fixture(scope="module")
def detr():
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, d_model=16, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, num_queries=7, **_labels())
    model = DetrForObjectDetection(config).eval()
    return model, DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return {"coffee": data.coffee(), "astronaut": data.astronaut(), "camera": data.camera()}


@pytest.mark.parametrize("detector", ["yolos", "detr"])
def test_regions_are_the_detections_with_their_query_states(request, detector, photos):
    model, image_processor = request.getfixturevalue(detector)
    extractor = CmalRegionExtractor(model, image_processor, score_threshold=0.0, top_k=5)
    image = Image.fromarray(photos["coffee"])
    regions = extractor(image)
    assert set(regions) == {"visual_feats", "visual_pos", "image_size", "tags", "scores"}
    assert regions["image_size"] == (600, 400)
    assert regions["visual_feats"].shape == (5, extractor.feature_dim) and regions["visual_feats"].dtype == np.float32
    assert regions["visual_pos"].shape == (5, 4) and regions["scores"].shape == (5,)
    assert all(tag in LABELS for tag in regions["tags"])
    assert (np.diff(regions["scores"]) <= 0).all()
    assert ((regions["visual_pos"] >= 0) & (regions["visual_pos"] <= [600, 400, 600, 400])).all()

    # Reference: every query's detection (threshold 0 keeps all, in query order), the best five by score.
    inputs = image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    num_queries = outputs.logits.shape[1]
    everything = image_processor.post_process_object_detection(outputs, threshold=0.0,
                                                               target_sizes=torch.tensor([[400, 600]]))[0]
    assert len(everything["scores"]) == num_queries
    best = torch.argsort(-everything["scores"], stable=True)[:5]
    torch.testing.assert_close(torch.from_numpy(regions["visual_feats"]),
                               outputs.last_hidden_state[0, -num_queries:][best])
    assert regions["tags"] == [LABELS[label] for label in everything["labels"][best].tolist()]
    torch.testing.assert_close(torch.from_numpy(regions["scores"]), everything["scores"][best])


def test_processor_runs_the_extractor_for_images(yolos, photos, tokenizer):
    model, image_processor = yolos
    extractor = CmalRegionExtractor(model, image_processor, score_threshold=0.0, top_k=4, batch_size=2)
    processor = CmalProcessor(tokenizer=tokenizer, region_extractor=extractor)
    images = [photos["coffee"], Image.fromarray(photos["astronaut"]), photos["camera"]]
    captions = ["a cup of espresso on a red saucer with a spoon", "a woman holds a black helmet",
                "a man using a camera"]
    outputs = processor(text=captions, images=images, return_tensors="pt")
    assert outputs["visual_feats"].shape == (3, 4, 32)
    assert outputs["visual_attention_mask"].tolist() == [[1] * 4] * 3
    assert ((outputs["visual_pos"] >= 0) & (outputs["visual_pos"] <= 1)).all()
    # The same regions given explicitly give the same inputs (the extractor's output is a valid regions dict).
    explicit = processor(text=captions, regions=extractor(images), return_tensors="pt")
    for name in outputs:
        assert torch.equal(outputs[name], explicit[name]), name
    regions = extractor(photos["coffee"])
    pieces = outputs["anchor_pairs"][0]
    for piece, region in pieces[pieces[:, 0] >= 0].tolist():
        word = tokenizer.convert_ids_to_tokens(int(outputs["input_ids"][0, piece]))
        assert processor.lexicon.concept_id(word) == processor.lexicon.tag_concept_id(regions["tags"][region])


def test_extractor_is_not_saved_with_the_processor(yolos, tokenizer, tmp_path):
    processor = CmalProcessor(tokenizer=tokenizer, region_extractor=CmalRegionExtractor(*yolos))
    processor.save_pretrained(tmp_path)
    assert CmalProcessor.from_pretrained(tmp_path).region_extractor is None
    restored = CmalProcessor.from_pretrained(tmp_path, region_extractor=processor.region_extractor)
    assert restored.region_extractor is processor.region_extractor


def test_invalid_extractor_arguments_and_images(yolos, tokenizer):
    model, image_processor = yolos
    with pytest.raises(ValueError, match="score_threshold"):
        CmalRegionExtractor(model, image_processor, score_threshold=1.5)
    with pytest.raises(ValueError, match="top_k"):
        CmalRegionExtractor(model, image_processor, top_k=0)
    with pytest.raises(ValueError, match="image_processor"):
        CmalRegionExtractor(model, tokenizer)
    with pytest.raises(ValueError, match="model must be"):
        CmalRegionExtractor(torch.nn.Linear(2, 2), image_processor)
    extractor = CmalRegionExtractor(model, image_processor)
    with pytest.raises(ValueError, match=r"images\[1\] must be a PIL image, a uint8 array"):
        extractor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="non-empty list"):
        extractor([])
    with pytest.raises(ValueError, match="region_extractor"):
        CmalProcessor(tokenizer=tokenizer, region_extractor="yolos")


def test_detector_without_query_states_is_refused(yolos):
    model, image_processor = yolos

    class NoHiddenStates(torch.nn.Module):
        config = model.config
        device, dtype = model.device, model.dtype

        def forward(self, **inputs):
            outputs = model(**inputs)
            outputs.last_hidden_state = None
            return outputs

    with pytest.raises(ValueError, match="no last_hidden_state"):
        CmalRegionExtractor(NoHiddenStates(), image_processor)(np.zeros((32, 48, 3), np.uint8))


def test_top_k_style_detections_are_traced_to_their_queries_by_box():
    query_boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 10, 10], [30, 30, 40, 40]])
    # Sorted by score over queries x classes: query 3, then query 1 twice (two labels), then the twin boxes 0 and 2.
    detections = query_boxes[[3, 1, 1, 0, 2]]
    queries = CmalRegionExtractor._trace_queries(detections, query_boxes)
    assert queries.tolist() == [3, 1, 1, 0, 2]
    aligned = CmalRegionExtractor._trace_queries(query_boxes.clone(), query_boxes)
    assert aligned.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("detector", ["yolos", "detr"])
@pytest.mark.parametrize("size", [(2000, 1), (1, 2000)])
def test_an_image_the_detector_cannot_take_is_named_with_its_size(request, detector, size):
    """2000 x 1 and 1 x 2000 used to end in a detector error naming no image (a ValueError about SizeDict from
    YOLOS' image processor, a RuntimeError about the kernel size from DETR's backbone)."""
    extractor = CmalRegionExtractor(*request.getfixturevalue(detector), score_threshold=0.0)
    width, height = size
    with pytest.raises(ValueError, match=rf"images\[0\] of {width}x{height} pixels cannot go through the detector "
                                         r"\(.*\); expected an image whose sides the detector's image processor can "
                                         r"resize"):
        extractor(Image.new("RGB", size))
    # in a list the failing image is found and named; the others go through when given alone
    with pytest.raises(ValueError, match=rf"images\[2\] of {width}x{height} pixels"):
        extractor([np.zeros((40, 60, 3), np.uint8), np.zeros((30, 30), np.uint8), np.zeros((height, width, 3),
                                                                                            np.uint8)])
    assert len(extractor([np.zeros((40, 60, 3), np.uint8), np.zeros((30, 30), np.uint8)])) == 2


@pytest.mark.parametrize("image, message", [
    (np.zeros((0, 0, 3), np.uint8), r"images\[0\] must be an image of at least 1 x 1 pixels; got .* of 0x0 pixels"),
    (np.zeros((0, 5), np.uint8), r"images\[0\] must be an image of at least 1 x 1 pixels; got .* of 5x0 pixels"),
    (Image.new("RGB", (0, 0)), r"images\[0\] must be an image of at least 1 x 1 pixels; got .* of 0x0 pixels"),
    (np.zeros((8, 8, 5), np.uint8), r"images\[0\] must be a PIL image, a uint8 array .*\(8, 8, 5\)"),
    (np.zeros((8, 8, 2), np.uint8), r"images\[0\] must be a PIL image, a uint8 array .*\(8, 8, 2\)"),
])
def test_empty_images_and_wrong_channel_counts_are_named(yolos, image, message):
    # 0 x 0 used to be a ZeroDivisionError from the image processor
    with pytest.raises(ValueError, match=message):
        CmalRegionExtractor(*yolos)(image)


def test_one_channel_arrays_are_grey_images(yolos):
    extractor = CmalRegionExtractor(*yolos, score_threshold=0.0, top_k=3)
    grey = np.random.default_rng(0).integers(0, 255, (40, 60), dtype=np.uint8)
    one_channel, plain = extractor(grey[:, :, None]), extractor(grey)
    np.testing.assert_array_equal(one_channel["visual_feats"], plain["visual_feats"])
    assert one_channel["image_size"] == (60, 40)
