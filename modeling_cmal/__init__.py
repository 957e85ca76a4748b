"""CMAL for Hugging Face transformers.

Importing this package registers the CMAL classes with the Auto classes in-process (`AutoConfig`, `AutoModel`,
`AutoModelForPreTraining`, `AutoModelForVisualQuestionAnswering`, `AutoModelForSequenceClassification`,
`AutoProcessor`) and marks them for `auto_map`, so that
`save_pretrained` writes the code files and a saved folder loads with `trust_remote_code=True` where this package
is not installed. It also registers the five `cmal-*` pipeline tasks with transformers' `PIPELINE_REGISTRY`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
    AutoProcessor,
)

from .anchoring import ConceptLexicon, anchor_statistics, find_anchors
from .collator_cmal import CmalPretrainingCollator
from .configuration_cmal import ANCHOR_ACTIONS, CMAL_SIZES, CmalConfig
from .convert_bert_to_cmal import bert_to_cmal_key_mapping, convert_bert_state_dict, load_bert_weights
from .convert_cmal_checkpoint import upgrade_checkpoint_folder, upgrade_scalar_parameters
from .modeling_cmal import (
    CMAL_AUTO_MAP,
    CmalForImageTextMatching,
    CmalForPreTraining,
    CmalForPreTrainingOutput,
    CmalForQuestionAnswering,
    CmalForReferringExpression,
    CmalForVisualEntailment,
    CmalForVisualReasoning,
    CmalModel,
    CmalModelOutput,
    CmalPreTrainedModel,
    CmalTaskOutput,
)
from .pipelines_cmal import (
    CMAL_PIPELINES,
    CmalImageTextMatchingPipeline,
    CmalPipeline,
    CmalReferringExpressionPipeline,
    CmalVisualEntailmentPipeline,
    CmalVisualQuestionAnsweringPipeline,
    CmalVisualReasoningPipeline,
)
from .processing_cmal import CmalProcessor, default_tokenizer
from .region_extraction import CmalRegionExtractor
from .region_processing_cmal import CmalRegionProcessor, select_top_regions

_AUTO_CLASSES = {
    AutoModel: CmalModel,
    AutoModelForPreTraining: CmalForPreTraining,
    AutoModelForVisualQuestionAnswering: CmalForQuestionAnswering,
    AutoModelForSequenceClassification: CmalForVisualEntailment,
}
# The referring-expression, image-text matching and NLVR2 heads fit no Auto class transformers uses for its
# vision-language models: their `auto_map` keys are their class names (CMAL_AUTO_MAP).

AutoConfig.register(CmalConfig.model_type, CmalConfig, exist_ok=True)
CmalConfig.register_for_auto_class()
for _auto_class, _model_class in _AUTO_CLASSES.items():
    _auto_class.register(CmalConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)
AutoProcessor.register(CmalConfig, CmalProcessor, exist_ok=True)
CmalProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ANCHOR_ACTIONS",
    "CMAL_AUTO_MAP",
    "CMAL_PIPELINES",
    "CMAL_SIZES",
    "ConceptLexicon",
    "CmalConfig",
    "CmalForImageTextMatching",
    "CmalForPreTraining",
    "CmalForPreTrainingOutput",
    "CmalForQuestionAnswering",
    "CmalForReferringExpression",
    "CmalForVisualEntailment",
    "CmalForVisualReasoning",
    "CmalImageTextMatchingPipeline",
    "CmalModel",
    "CmalModelOutput",
    "CmalPipeline",
    "CmalPreTrainedModel",
    "CmalPretrainingCollator",
    "CmalProcessor",
    "CmalReferringExpressionPipeline",
    "CmalRegionExtractor",
    "CmalRegionProcessor",
    "CmalTaskOutput",
    "CmalVisualEntailmentPipeline",
    "CmalVisualQuestionAnsweringPipeline",
    "CmalVisualReasoningPipeline",
    "anchor_statistics",
    "bert_to_cmal_key_mapping",
    "convert_bert_state_dict",
    "default_tokenizer",
    "find_anchors",
    "load_bert_weights",
    "select_top_regions",
    "upgrade_checkpoint_folder",
    "upgrade_scalar_parameters",
]
