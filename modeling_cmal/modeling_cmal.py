"""PyTorch CMAL model: Cross-Modal Associative Learning for vision-language pre-training (ACM MM 2022).

Data flow (docs/model.md): word pieces and detected regions are encoded by two uni-modal encoders whose outputs
are L2-normalised onto two hyperspheres (UMSE); at anchor pairs (a word and a region naming the same concept)
content is swapped between the modalities while every slot keeps its own position (CMAP); a unified encoder
runs over ``[CLS] text [SEP] regions`` (USE); the pre-training heads classify the anchor concept at the slots whose
own content was masked while their partner stayed in place (AMC: readable only through the other modality),
predict masked words (MLM) and tell matched from mismatched pairs (ITM). Task heads read the pooled `[CLS]` together
with the mean of the text slots and that of the anchored words' slots (`CmalTaskPooler`, `config.task_pooling`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial, wraps

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import custom_object_save
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, auto_docstring
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_cmal import ANCHOR_ACTIONS, CmalConfig
from .distributed_cmal import gather_with_gradients
from .validation_cmal import (
    text_shape,
    validate_class_labels,
    validate_cmal_inputs,
    validate_image_pair_inputs,
    validate_match_labels,
    validate_pretraining_targets,
    validate_region_labels,
    validate_soft_scores,
)

ACTION_KEEP, ACTION_FILL_TEXT, ACTION_FILL_REGION, ACTION_MASK_BOTH, ACTION_MASK_TEXT, ACTION_MASK_REGION = range(
    len(ANCHOR_ACTIONS)
)
TEXT_TYPE, REGION_TYPE = 0, 1


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CmalModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, text_length + num_regions, hidden_size)`):
        Unified-encoder output over the hybrid sequence `[CLS] text [SEP] regions`.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Pooled `[CLS]` state (dense + tanh).
    text_embeds (`torch.FloatTensor` of shape `(batch_size, text_length, hidden_size)`):
        Text-encoder output on the text hypersphere (unit norm unless the config disables normalisation).
    image_embeds (`torch.FloatTensor` of shape `(batch_size, num_regions, hidden_size)`):
        Region-encoder output on the visual hypersphere.
    text_hidden_states / vision_hidden_states / hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Embeddings plus every layer's output of the text, region and unified encoder (`output_hidden_states=True`).
        `hidden_states[0]` is the hybrid sequence after CMAP.
    text_attentions / vision_attentions / attentions (`tuple(torch.FloatTensor)`, *optional*):
        Attention probabilities of every layer, each `(batch_size, num_heads, length, length)`
        (`output_attentions=True`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    vision_attentions: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CmalForPreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Weighted sum of the objectives whose targets were given.
    amc_loss / mlm_loss / itm_loss / itc_loss / mrfr_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Each objective's unweighted loss.
    amc_logits (`torch.FloatTensor` of shape `(batch_size, num_anchor_rows, num_anchor_concepts)`):
        Concept logits at each anchor row's AMC slot (see `anchor_targets`): the word's first piece for *mask
        text*, the region slot for *mask region*.
    amc_labels (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`): the concept of each row that has an
        AMC target, -100 elsewhere (other pieces of a word, other actions, padding).
    amc_slot_is_text (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`): 1 for rows whose target is a
        text slot, 0 otherwise.
    amc_pairing_loss (`torch.FloatTensor` of shape `()`, *optional*): AMC's mapping term (part of `amc_loss`).
    amc_pairing_logits (`torch.FloatTensor` of shape `(batch_size, num_anchor_rows, num_regions)`): similarity of
        each anchor row's word (text hypersphere) with every region of its image (visual hypersphere).
    amc_pairing_labels (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`): the row's own region, -100
        where the row has no mapping target (see `anchor_pairing_targets`).
    mlm_logits (`torch.FloatTensor`): `(num_labelled_pieces, vocab_size)` at the positions where `labels` is
        set, or `(batch_size, text_length, vocab_size)` when no `labels` are given.
    itm_logits (`torch.FloatTensor` of shape `(batch_size, 2)`): mismatch / match logits.
    itc_logits (`torch.FloatTensor` of shape `(num_matched_pairs, global_num_matched_pairs)`, *optional*):
        text-to-image similarities (times the learned inverse temperature) of this process's matched pairs against
        the matched pairs of every process, when the contrastive objective is on.
    """

    loss: torch.FloatTensor | None = None
    amc_loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    mrfr_loss: torch.FloatTensor | None = None
    amc_logits: torch.FloatTensor | None = None
    amc_labels: torch.LongTensor | None = None
    amc_slot_is_text: torch.LongTensor | None = None
    amc_pairing_loss: torch.FloatTensor | None = None
    amc_pairing_logits: torch.FloatTensor | None = None
    amc_pairing_labels: torch.LongTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itc_logits: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------


class CmalTextEmbeddings(nn.Module):
    """BERT embeddings: word + position + token type, LayerNorm, dropout (names match BERT checkpoints)."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        """`input_ids` / `token_type_ids` `[B, N]` or `inputs_embeds` `[B, N, H]` → `[B, N, H]`."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        position_ids = self.position_ids[:, : inputs_embeds.shape[1]]
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class CmalBoxEmbeddings(nn.Module):
    """`LN(W_b geometry(box))` with geometry = (x1, y1, x2, y2, w, h) of boxes normalised to [0, 1]."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.dense = nn.Linear(6, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, visual_pos: torch.Tensor) -> torch.Tensor:
        """`visual_pos` `[B, M, 4]` → `[B, M, H]`."""
        width = visual_pos[..., 2:3] - visual_pos[..., 0:1]
        height = visual_pos[..., 3:4] - visual_pos[..., 1:2]
        geometry = torch.cat([visual_pos, width, height], dim=-1)
        return self.LayerNorm(self.dense(geometry))


class CmalVisualEmbeddings(nn.Module):
    """Region embeddings: `LN(W_f feat) + LN(W_b geometry(box))`, dropout.

    A region whose features are all zeros (a *mask region* anchor, hidden so by the collator, or a padding slot)
    takes the learned `mask_embedding` in place of `LN(W_f feat)`, as a masked word takes the `[MASK]` embedding.
    `LN(W_f 0 + b)` would normalise the bias alone: its variance is 0 at initialisation, and LayerNorm's backward
    multiplies such a slot's gradient by up to `1 / sqrt(eps)` (1e6). Measured on a tiny model's first pre-training
    batch: 1.7e5 at the projection bias against < 11 for every other tensor, so gradient clipping scaled all other
    gradients of every batch with a masked region by about 1e-5."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.feature_projection = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.feature_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, visual_feats: torch.Tensor, box_embeds: torch.Tensor) -> torch.Tensor:
        """`visual_feats` `[B, M, Dv]`, `box_embeds` `[B, M, H]` → `[B, M, H]`."""
        features = self.feature_LayerNorm(self.feature_projection(visual_feats))
        blank = (visual_feats == 0).all(dim=-1, keepdim=True)  # [B, M, 1]
        features = torch.where(blank, self.mask_embedding.to(features.dtype), features)
        return self.dropout(features + box_embeds)


# --------------------------------------------------------------------------------------------------------------
# Transformer layers (BERT-shaped so that BERT checkpoints initialise them)
# --------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class CmalSelfAttention(nn.Module):
    def __init__(self, config: CmalConfig):
        super().__init__()
        self.config = config
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_causal = False

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        """`hidden_states` `[B, L, H]` → (`[B, L, H]`, attention probabilities `[B, heads, L, L]` or None)."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        # Attention probabilities exist only in the eager path: asking for them selects it for this call.
        attention_interface: Callable = eager_attention_forward
        if not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
        )
        return attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous(), attn_weights


class CmalSelfOutput(nn.Module):
    def __init__(self, config: CmalConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class CmalAttention(nn.Module):
    def __init__(self, config: CmalConfig):
        super().__init__()
        self.self = CmalSelfAttention(config)
        self.output = CmalSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attn_output, attn_weights = self.self(hidden_states, attention_mask, output_attentions)
        return self.output(attn_output, hidden_states), attn_weights


class CmalIntermediate(nn.Module):
    def __init__(self, config: CmalConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class CmalOutput(nn.Module):
    def __init__(self, config: CmalConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class CmalLayer(GradientCheckpointingLayer):
    """One BERT layer: self-attention, feed-forward, post-LayerNorm residuals."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.attention = CmalAttention(config)
        self.intermediate = CmalIntermediate(config)
        self.output = CmalOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        """`hidden_states` `[B, L, H]` → (`[B, L, H]`, attention probabilities or None)."""
        attention_output, attn_weights = self.attention(hidden_states, attention_mask, output_attentions)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, attn_weights


class CmalEncoder(nn.Module):
    """A stack of `num_layers` `CmalLayer`s; used for the text, region and unified encoders. Every layer's output
    (and attention probabilities) is recorded by `capture_outputs` when asked for."""

    def __init__(self, config: CmalConfig, num_layers: int):
        super().__init__()
        self.layer = nn.ModuleList([CmalLayer(config) for _ in range(num_layers)])

    def forward(self, hidden_states, attention_mask=None, output_attentions=False) -> torch.Tensor:
        """`hidden_states` `[B, L, H]` → `[B, L, H]`. `output_attentions` selects the eager attention for this call
        (attention probabilities exist only there)."""
        for layer in self.layer:
            hidden_states, _ = layer(hidden_states, attention_mask, output_attentions)
        return hidden_states


# --------------------------------------------------------------------------------------------------------------
# UMSE → CMAP → hybrid sequence
# --------------------------------------------------------------------------------------------------------------


class CmalHypersphere(nn.Module):
    """Projects uni-modal states onto the unit hypersphere and keeps the learnable scale that restores their
    magnitude before fusion (one instance per modality)."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        # One element, not a 0-dim tensor: FSDP2 shards every parameter along its first dimension. Checkpoints
        # written with the 0-dim scale (before 2026-12-02) are converted by `upgrade_scalar_parameters`.
        self.scale = nn.Parameter(torch.full((1,), math.sqrt(config.hidden_size)))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L, H]` → (unit-norm embeddings `[B, L, H]`, scaled content `[B, L, H]`)."""
        embeds = F.normalize(hidden_states, dim=-1)
        return embeds, embeds * self.scale


class CmalAssociativePrompt(nn.Module):
    """CMAP: moves content between the modalities at anchor pairs; positions never move.

    Per anchor row `(piece j, region i)` and action:
    - keep: nothing changes;
    - fill text: text slot j receives region i's content, region slot i holds the region mask vector;
    - fill region: region slot i receives the mean content of the word's pieces, those text slots hold the text
      mask vector;
    - mask both: text slot j and region slot i hold their modality's mask vector;
    - mask text / mask region: nothing changes here. The word (its pieces are [MASK]) or the region (its features
      are zeros) was hidden at the encoder's input by the pre-training collator, so its slot holds what the
      encoder made of the context, and its partner stays as it is: AMC reads the concept from there.
    """

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.text_mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.region_mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, text_content, region_content, anchor_pairs, anchor_actions):
        """`text_content` `[B, N, H]`, `region_content` `[B, M, H]`, `anchor_pairs` `[B, K, 2]` (`[-1, -1]` padding),
        `anchor_actions` `[B, K]` → (text content `[B, N, H]`, region content `[B, M, H]`).

        A fixed-shape program: each row's action becomes a per-slot map (`[B, K, N]` and `[B, K, M]` one-hots of
        the slots it points at), and every slot takes its new content through `torch.where`; the mask vectors are
        in the graph whatever the batch (DDP needs a gradient for every parameter in every step). A slot that
        several rows fill takes their mean."""
        # Under autocast the two encoders may return different dtypes (e.g. bf16 regions, float32 text after a
        # LayerNorm kept in float32): content moves between them, so both take the wider one.
        common = torch.promote_types(text_content.dtype, region_content.dtype)
        text_content, region_content = text_content.to(common), region_content.to(common)
        hidden_size = text_content.shape[-1]
        pieces, regions = anchor_pairs[..., 0], anchor_pairs[..., 1]
        valid = ((pieces >= 0) & (regions >= 0)).unsqueeze(-1)
        at_piece = (pieces.unsqueeze(-1) == torch.arange(text_content.shape[1], device=pieces.device)) & valid
        at_region = (regions.unsqueeze(-1) == torch.arange(region_content.shape[1], device=regions.device)) & valid
        actions = anchor_actions.unsqueeze(-1)
        fill_text, fill_region, mask_both = (actions == ACTION_FILL_TEXT, actions == ACTION_FILL_REGION,
                                             actions == ACTION_MASK_BOTH)

        def expand(index: torch.Tensor) -> torch.Tensor:
            return index.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden_size)

        new_text, new_region = text_content, region_content
        if region_content.shape[1] > 0:  # a static shape: without regions there is nothing to move
            # Fill text: the word's pieces receive the content of the row's region.
            text_weights = (at_piece & fill_text).to(common)  # [B, K, N]
            region_at_rows = region_content.gather(1, expand(regions))  # [B, K, H]
            text_count = text_weights.sum(1).unsqueeze(-1)  # [B, N, 1]
            text_fill = torch.einsum("bkn,bkh->bnh", text_weights, region_at_rows) / text_count.clamp(min=1)
            new_text = torch.where(text_count > 0, text_fill, text_content)
            # Fill region: the region receives the mean content of the word's pieces.
            region_weights = (at_region & fill_region).to(common)  # [B, K, M]
            text_at_rows = text_content.gather(1, expand(pieces))  # [B, K, H]
            region_count = region_weights.sum(1).unsqueeze(-1)  # [B, M, 1]
            region_fill = torch.einsum("bkm,bkh->bmh", region_weights, text_at_rows) / region_count.clamp(min=1)
            new_region = torch.where(region_count > 0, region_fill, region_content)
        # The slot whose content left (or that both lose, for mask both) holds its modality's mask vector.
        text_masked = (at_piece & (fill_region | mask_both)).any(1).unsqueeze(-1)
        region_masked = (at_region & (fill_text | mask_both)).any(1).unsqueeze(-1)
        new_text = torch.where(text_masked, self.text_mask_embedding.to(common), new_text)
        new_region = torch.where(region_masked, self.region_mask_embedding.to(common), new_region)
        return new_text, new_region


class CmalHybridEmbeddings(nn.Module):
    """Adds each slot's own position (text) or box (region) embedding and its modality type embedding to the
    content after CMAP, then LayerNorm and dropout."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.modality_type_embeddings = nn.Embedding(2, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, text_content, text_position_embeds, region_content, box_embeds) -> torch.Tensor:
        """Text `[B, N, H]` and region `[B, M, H]` parts → hybrid sequence `[B, N + M, H]`."""
        text = text_content + text_position_embeds + self.modality_type_embeddings.weight[TEXT_TYPE]
        region = region_content + box_embeds + self.modality_type_embeddings.weight[REGION_TYPE]
        return self.dropout(self.LayerNorm(torch.cat([text, region], dim=1)))


class CmalPooler(nn.Module):
    def __init__(self, config: CmalConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, L, H]` → the `[CLS]` state through dense + tanh, `[B, H]`."""
        return self.activation(self.dense(hidden_states[:, 0]))


# The inputs of every CMAL forward besides transformers' standard ones (`input_ids`, `attention_mask`,
# `token_type_ids`, `inputs_embeds`, `output_attentions`, ...), for `auto_docstring`.
CMAL_INPUTS_DOCSTRING = r"""
    visual_feats (`torch.FloatTensor` of shape `(batch_size, num_regions, visual_feat_dim)`):
        Features of the image's detected regions (`CmalProcessor`'s `regions`).
    visual_pos (`torch.FloatTensor` of shape `(batch_size, num_regions, 4)`):
        Region boxes `x1, y1, x2, y2` normalised to `[0, 1]`.
    visual_attention_mask (`torch.LongTensor` of shape `(batch_size, num_regions)`, *optional*):
        1 for a real region, 0 for padding.
    anchor_pairs (`torch.LongTensor` of shape `(batch_size, num_anchor_rows, 2)`, *optional*):
        Anchors: rows `(text piece position, region index)`, `[-1, -1]` for padding; a word of several pieces gives
        one row per piece.
    anchor_concept_ids (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`, *optional*):
        The concept of each anchor row (AMC's targets in pre-training; only validated otherwise).
    anchor_actions (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`, *optional*):
        0 keep, 1 fill text, 2 fill region, 3 mask both, 4 mask text, 5 mask region; defaults to
        `config.default_anchor_action` (the one policy of fine-tuning and inference).
"""


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _per_encoder_output_flags(forward):
    """`output_hidden_states` / `output_attentions` ask for the outputs of all three encoders: `capture_outputs`
    reads one flag per recorded key (`output_text_hidden_states`, ...), so each of them defaults to the general
    one."""

    @wraps(forward)
    def wrapper(self, *args, **kwargs):
        for kind in ("hidden_states", "attentions"):
            flag = kwargs.get(f"output_{kind}")
            flag = getattr(self.config, f"output_{kind}", False) if flag is None else flag
            kwargs[f"output_{kind}"] = flag
            for encoder in ("text", "vision"):
                if kwargs.get(f"output_{encoder}_{kind}") is None:
                    kwargs[f"output_{encoder}_{kind}"] = flag
        return forward(self, *args, **kwargs)

    return wrapper


class CmalPreTrainedModel(PreTrainedModel):
    config: CmalConfig
    config_class = CmalConfig
    base_model_prefix = "cmal"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CmalLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # What `output_hidden_states` / `output_attentions` return, recorded by hooks (`capture_outputs`): the unified
    # encoder's as `hidden_states` / `attentions`, the uni-modal encoders' under their own names.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(CmalLayer, index=0, layer_name="unified_encoder"),
        "attentions": OutputRecorder(CmalSelfAttention, index=1, layer_name="unified_encoder"),
        # Only the `hidden_states` key captures the first layer's input: the uni-modal ones record their embeddings.
        "text_hidden_states": [OutputRecorder(CmalTextEmbeddings),
                               OutputRecorder(CmalLayer, index=0, layer_name="text_encoder")],
        "text_attentions": OutputRecorder(CmalSelfAttention, index=1, layer_name="text_encoder"),
        "vision_hidden_states": [OutputRecorder(CmalVisualEmbeddings),
                                 OutputRecorder(CmalLayer, index=0, layer_name="visual_encoder")],
        "vision_attentions": OutputRecorder(CmalSelfAttention, index=1, layer_name="visual_encoder"),
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CmalTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, CmalHypersphere):
            init.constant_(module.scale, math.sqrt(self.config.hidden_size))
        elif isinstance(module, CmalVisualEmbeddings):
            init.normal_(module.mask_embedding, std=self.config.initializer_range)
        elif isinstance(module, CmalAssociativePrompt):
            init.normal_(module.text_mask_embedding, std=self.config.initializer_range)
            init.normal_(module.region_mask_embedding, std=self.config.initializer_range)
        elif isinstance(module, CmalLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, CmalAnchorPairingHead):
            init.constant_(module.logit_scale, math.log(1 / self.config.anchor_pairing_temperature))
        elif isinstance(module, CmalContrastiveHead):
            init.constant_(module.logit_scale, math.log(1 / self.config.itc_temperature))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a weights file that is not readable safetensors (truncated by a cut
        download, empty, or something else under the name) is a `ValueError` naming the file, not a bare
        `SafetensorError`."""
        from safetensors import SafetensorError

        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            import os

            location = os.fspath(pretrained_model_name_or_path)
            if os.path.isdir(location):
                names = sorted(name for name in os.listdir(location) if name.endswith(".safetensors"))
                location = ", ".join(os.path.join(location, name) for name in names) or location
            raise ValueError(
                f"{location} is not a readable safetensors file ({error}): the file was cut short (an interrupted "
                "download or copy), is empty, or holds something else; save or download the model again"
            ) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, plus the `auto_map` of every CMAL head and the code files, so the
        folder loads as any head with `trust_remote_code=True` where this package is not installed. The model's own
        config is left as it was."""
        previous = getattr(self.config, "auto_map", None)
        self.config.auto_map = {**(previous or {}), **CMAL_AUTO_MAP}
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.auto_map = previous
            if previous is None:
                del self.config.auto_map
        if self._auto_class is None:
            # Heads without a transformers Auto class are not copied by transformers itself: this file, the
            # configuration and every sibling file they import.
            custom_object_save(self, save_directory)


class CmalModel(CmalPreTrainedModel):
    """The CMAL trunk: UMSE (text and region encoders on two hyperspheres), CMAP (anchor swap filling) and USE
    (unified encoder + pooler).

    `add_pooling_layer=False` leaves the pooler out, for heads that do not read it (every parameter must take
    part in every step under DDP without `find_unused_parameters`).

    Every shape of `forward` follows from the inputs' shapes (no data-dependent branch), so it compiles with
    `torch.compile(fullgraph=True)` and exports with `torch.export`; the inputs' value checks run in eager mode
    only."""

    def __init__(self, config: CmalConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.text_embeddings = CmalTextEmbeddings(config)
        self.text_encoder = CmalEncoder(config, config.num_text_layers)
        self.box_embeddings = CmalBoxEmbeddings(config)
        self.visual_embeddings = CmalVisualEmbeddings(config)
        self.visual_encoder = CmalEncoder(config, config.num_visual_layers)
        self.text_hypersphere = CmalHypersphere(config)
        self.visual_hypersphere = CmalHypersphere(config)
        self.associative_prompt = CmalAssociativePrompt(config)
        self.hybrid_embeddings = CmalHybridEmbeddings(config)
        self.unified_encoder = CmalEncoder(config, config.num_unified_layers)
        self.pooler = CmalPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_embeddings.word_embeddings = value

    def default_anchor_actions(self, anchor_pairs: torch.Tensor) -> torch.Tensor:
        """`config.default_anchor_action` for every row of `anchor_pairs` `[B, K, 2]` → `[B, K]`."""
        action = ANCHOR_ACTIONS.index(self.config.default_anchor_action)
        return torch.full(anchor_pairs.shape[:2], action, dtype=torch.long, device=anchor_pairs.device)

    @_per_encoder_output_flags
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING + r"""
    output_attentions (`bool`, *optional*):
        Return the attention probabilities of every layer: the unified encoder's as `attentions`, the uni-modal
        encoders' as `text_attentions` and `vision_attentions` (the eager attention runs for that call).
    """)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.LongTensor | None = None,
        anchor_pairs: torch.LongTensor | None = None,
        anchor_concept_ids: torch.LongTensor | None = None,
        anchor_actions: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> CmalModelOutput:
        validate_cmal_inputs(
            self.config, input_ids, inputs_embeds, attention_mask, token_type_ids, visual_feats, visual_pos,
            visual_attention_mask, anchor_pairs, anchor_concept_ids, anchor_actions,
        )
        batch_size, text_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        num_regions = visual_feats.shape[1]
        device = visual_feats.device
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, text_length, dtype=torch.long, device=device)
        if visual_attention_mask is None:
            visual_attention_mask = torch.ones(batch_size, num_regions, dtype=torch.long, device=device)
        if anchor_pairs is None:  # no anchors: CMAP still runs (a no-op), so its parameters are in every graph
            anchor_pairs = torch.full((batch_size, 0, 2), -1, dtype=torch.long, device=device)
        if anchor_actions is None:
            anchor_actions = self.default_anchor_actions(anchor_pairs)

        # UMSE: two uni-modal encoders, outputs on two hyperspheres.
        text_hidden = self.text_embeddings(input_ids, token_type_ids, inputs_embeds)
        text_mask = create_bidirectional_mask(self.config, text_hidden, attention_mask)
        text_hidden = self.text_encoder(text_hidden, text_mask, output_attentions)
        text_embeds, text_content = self.text_hypersphere(text_hidden)

        visual_feats = visual_feats.to(text_hidden.dtype)
        box_embeds = self.box_embeddings(visual_pos.to(text_hidden.dtype))
        region_hidden = self.visual_embeddings(visual_feats, box_embeds)
        # An image without regions would leave its attention rows empty (NaN in sdpa); its slots stay masked in the
        # unified encoder, so letting them attend to each other here changes nothing downstream.
        no_region = visual_attention_mask.sum(dim=1, keepdim=True) == 0
        region_mask = create_bidirectional_mask(
            self.config, region_hidden,
            torch.where(no_region, torch.ones_like(visual_attention_mask), visual_attention_mask),
        ) if num_regions > 0 else None
        if num_regions > 0:  # a static shape; attention over zero regions cannot even be reshaped
            region_hidden = self.visual_encoder(region_hidden, region_mask, output_attentions)
        image_embeds, region_content = self.visual_hypersphere(region_hidden)

        # CMAP: swap filling at anchors; positions stay with their slots.
        text_content, region_content = self.associative_prompt(text_content, region_content, anchor_pairs,
                                                               anchor_actions)
        text_position_embeds = self.text_embeddings.position_embeddings(
            self.text_embeddings.position_ids[:, :text_length]
        )
        hybrid = self.hybrid_embeddings(text_content, text_position_embeds, region_content, box_embeds)

        # USE: unified encoder over [CLS] text [SEP] regions.
        hybrid_mask = create_bidirectional_mask(
            self.config, hybrid, torch.cat([attention_mask, visual_attention_mask.to(attention_mask.dtype)], dim=1)
        )
        sequence_output = self.unified_encoder(hybrid, hybrid_mask, output_attentions)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return CmalModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )


# --------------------------------------------------------------------------------------------------------------
# Pre-training heads
# --------------------------------------------------------------------------------------------------------------


class CmalPredictionHeadTransform(nn.Module):
    def __init__(self, config: CmalConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class CmalLMPredictionHead(nn.Module):
    """MLM decoder; its weight is tied to the word embeddings."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.transform = CmalPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` → `[..., vocab_size]`."""
        return self.decoder(self.transform(hidden_states))


class CmalConceptHead(nn.Module):
    """AMC: one classifier shared by both modalities, slot state → anchor concept."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.transform = CmalPredictionHeadTransform(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_anchor_concepts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[S, H]` → `[S, num_anchor_concepts]`."""
        return self.classifier(self.transform(hidden_states))


class CmalRegionFeatureHead(nn.Module):
    """MRFR: region slot state → the region's input features (normalised per region)."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.transform = CmalPredictionHeadTransform(config)
        self.regressor = nn.Linear(config.hidden_size, config.visual_feat_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, M, H]` → `[B, M, visual_feat_dim]`."""
        return self.regressor(self.transform(hidden_states))


class CmalContrastiveHead(nn.Module):
    """ITC: symmetric InfoNCE between the mean-pooled text and region hypersphere embeddings of matched pairs, with
    a learnable temperature; in-batch negatives are the matched pairs of every process. Off in the paper's
    objectives (the contrastive baseline of the ablation), on beside AMC in the repository's main job."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        # One element, not a 0-dim tensor: FSDP2 shards every parameter along its first dimension.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / config.itc_temperature)))
        self.max_logit_scale = math.log(1 / config.itc_min_temperature)

    @staticmethod
    def _pool(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(embeds.dtype).unsqueeze(-1)
        return F.normalize((embeds * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)

    def forward(self, text_embeds, attention_mask, image_embeds, visual_attention_mask, pair_mask):
        """`text_embeds` `[B, N, H]`, `attention_mask` `[B, N]`, `image_embeds` `[B, M, H]`, `visual_attention_mask`
        `[B, M]`, `pair_mask` `[B]` bool (the matched pairs) → (text-to-image logits `[B, G]`, image-to-text logits
        `[B, G]`, targets `[B]`): `G` columns (`world_size * B`, more where the ranks' batch sizes differ), the pairs
        of every process in rank order, those that are not matched (or padding) at the dtype's minimum; `targets` is
        each local pair's column, -100 where it is not matched."""
        text = self._pool(text_embeds, attention_mask)
        image = self._pool(image_embeds, visual_attention_mask)
        all_text, all_image, all_matched, offset = text, image, pair_mask, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # The matched flag travels as the last column, so one gather (with gradients) carries everything.
            rows = torch.cat([text, image, pair_mask.to(text.dtype).unsqueeze(-1)], dim=-1)
            gathered, offset = gather_with_gradients(rows)
            all_text, all_image = gathered[:, :text.shape[-1]], gathered[:, text.shape[-1]:-1]
            all_matched = gathered[:, -1] > 0
        scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()
        unmatched_columns = ~all_matched.unsqueeze(0)
        minimum = torch.finfo(text.dtype).min
        logits_per_text = (scale * text @ all_image.t()).masked_fill(unmatched_columns, minimum)
        logits_per_image = (scale * image @ all_text.t()).masked_fill(unmatched_columns, minimum)
        columns = torch.arange(text.shape[0], device=text.device) + offset
        targets = torch.where(pair_mask, columns, torch.full_like(columns, -100))
        return logits_per_text, logits_per_image, targets


def _masked_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the rows whose label is not -100; 0 (still in the graph) when there is none, so
    the loss needs no data-dependent branch. `logits` `[..., C]`, `labels` `[...]`."""
    per_row = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none", ignore_index=-100)
    return per_row.sum() / (labels != -100).sum().clamp(min=1)


def _first_piece_rows(anchor_pairs: torch.Tensor) -> torch.Tensor:
    """`[B, K]` bool: the row of each anchor's first piece (the rows of one anchor share its region; its first piece
    is the row with no smaller piece of that region)."""
    pieces, regions = anchor_pairs[..., 0], anchor_pairs[..., 1]
    valid = pieces >= 0
    same_anchor = (regions.unsqueeze(2) == regions.unsqueeze(1)) & valid.unsqueeze(1)
    return valid & ~(same_anchor & (pieces.unsqueeze(1) < pieces.unsqueeze(2))).any(-1)


def anchor_pairing_targets(anchor_pairs: torch.Tensor, anchor_actions: torch.Tensor) -> torch.Tensor:
    """The region each anchor word must be mapped to, per row `[B, K]` (-100 where there is none): the first piece
    of every anchor except *mask region* ones, whose region is hidden at the input (pointing at it would be
    pointing at the one blank region)."""
    regions = anchor_pairs[..., 1]
    has_target = _first_piece_rows(anchor_pairs) & (anchor_actions != ACTION_MASK_REGION)
    return torch.where(has_target, regions, torch.full_like(regions, -100))


class CmalAnchorPairingHead(nn.Module):
    """AMC's mapping term on the two hyperspheres: the cosine similarity of an anchor word's text embedding with
    every region embedding of its image, times a learned inverse temperature, classified towards its own region.

    The word's state comes from the text encoder alone and carries no box, so the partner can be found only by
    content: this is where the two hyperspheres meet, and what makes the content that CMAP moves between them
    comparable."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        # One element, not a 0-dim tensor: FSDP2 shards every parameter along its first dimension.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / config.anchor_pairing_temperature)))
        self.max_logit_scale = math.log(1 / config.anchor_pairing_min_temperature)

    def forward(self, text_embeds, image_embeds, anchor_pairs, visual_attention_mask) -> torch.Tensor:
        """`text_embeds` `[B, N, H]`, `image_embeds` `[B, M, H]` (unit norm), `anchor_pairs` `[B, K, 2]`,
        `visual_attention_mask` `[B, M]` → logits `[B, K, M]` (padding regions get the dtype's minimum)."""
        pieces = anchor_pairs[..., 0].clamp(min=0)
        words = text_embeds.gather(1, pieces.unsqueeze(-1).expand(-1, -1, text_embeds.shape[-1]))
        scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()
        logits = scale * torch.einsum("bkh,bmh->bkm", words.to(image_embeds.dtype), image_embeds)
        return logits.masked_fill((visual_attention_mask == 0).unsqueeze(1), torch.finfo(logits.dtype).min)


def anchor_targets(anchor_pairs, anchor_actions, anchor_concept_ids, text_length):
    """Where AMC classifies and what: one slot per anchor row, laid out like the rows (a fixed shape).

    An anchor has an AMC target when its own content was hidden at the encoder's input (by the pre-training
    collator) while its partner stayed in place, in its own modality and slot: *mask text* (the word's pieces are
    [MASK], the region it names is intact; the target sits at the word's first piece) and *mask region* (the
    region's features are zeros, its box stays, the word that names it is intact; the target sits at the region
    slot). The concept can then be read only through the other modality, found
    from the context; never from the slot's own content, and never by matching a box (no content moved). Filled
    anchors carry no AMC target: their slot holds the partner's own state, from which the concept is a copy.

    `anchor_pairs` `[B, K, 2]`, `anchor_actions` / `anchor_concept_ids` `[B, K]` → (hybrid-sequence position of
    each row's slot `[B, K]`, concept target `[B, K]` with -100 where the row has none, is-text-target `[B, K]`).
    """
    pieces, regions = anchor_pairs[..., 0], anchor_pairs[..., 1]
    is_first = _first_piece_rows(anchor_pairs)
    text_target = is_first & (anchor_actions == ACTION_MASK_TEXT)
    region_target = is_first & (anchor_actions == ACTION_MASK_REGION)
    positions = torch.where(region_target, text_length + regions.clamp(min=0), pieces.clamp(min=0))
    labels = torch.where(text_target | region_target, anchor_concept_ids, torch.full_like(anchor_concept_ids, -100))
    return positions, labels, text_target


class CmalForPreTraining(CmalPreTrainedModel):
    """CMAL with its pre-training objectives: AMC (mapping + concept), MLM (tied decoder) and ITM (+ optional ITC
    and MRFR).

    A head exists only when its objective's weight is > 0 (and the pooler only when ITM reads it), so that every
    parameter takes part in every step: DDP runs without `find_unused_parameters`, whatever objectives are on.

    AMC needs no extra labels (its loss is computed when `anchor_concept_ids` are given): its concept term
    classifies `anchor_concept_ids` at the *mask text* and *mask region* anchors (`anchor_targets`), its mapping
    term maps every other anchor word to its own region (`anchor_pairing_targets`); `amc_loss` is their sum.
    Each objective's loss is computed when its targets are given and its config weight is > 0 (a batch
    without any target of an objective, e.g. no anchors, gives that objective 0, still in the graph); `loss` is
    their weighted sum. ITC (when `config.itc_loss_weight > 0`) is computed whenever `itm_labels` are given,
    over the pairs with `itm_labels == 1`, symmetric (mean of the text-to-image and image-to-text
    cross-entropies), with the matched pairs of every process as negatives.
    """

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.cmal = CmalModel(config, add_pooling_layer=config.itm_loss_weight > 0)
        self.cls = CmalLMPredictionHead(config) if config.mlm_loss_weight > 0 else None
        self.amc_head = CmalConceptHead(config) if config.amc_loss_weight > 0 else None
        self.amc_pairing_head = CmalAnchorPairingHead(config) if config.amc_loss_weight > 0 else None
        self.itm_head = nn.Linear(config.hidden_size, 2) if config.itm_loss_weight > 0 else None
        self.itc_head = CmalContrastiveHead(config) if config.itc_loss_weight > 0 else None
        self.mrfr_head = CmalRegionFeatureHead(config) if config.mrfr_loss_weight > 0 else None
        # The MLM decoder is tied to the word embeddings only where it exists.
        self._tied_weights_keys = ({"cls.decoder.weight": "cmal.text_embeddings.word_embeddings.weight",
                                    "cls.decoder.bias": "cls.bias"} if self.cls is not None else {})
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.cls.decoder if self.cls is not None else None

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.decoder = new_embeddings
        self.cls.bias = new_embeddings.bias

    @can_return_tuple
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING + r"""
    labels (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
        MLM targets, -100 where no piece is predicted.
    itm_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        1 when the caption matches the image, 0 when it does not.
    mlm_positions (`torch.LongTensor` of shape `(batch_size, num_predictions)`, *optional*):
        The piece positions at which MLM predicts (-1 padding), as BERT's `masked_lm_positions`: the vocabulary
        decoder then runs on `num_predictions` slots per row instead of all `text_length` (the pre-training
        collator gives them; `collator_cmal.mlm_prediction_positions` makes them from `labels`). Labels at
        positions not listed are not predicted.
    """)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.LongTensor | None = None,
        anchor_pairs: torch.LongTensor | None = None,
        anchor_concept_ids: torch.LongTensor | None = None,
        anchor_actions: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        itm_labels: torch.LongTensor | None = None,
        mlm_positions: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CmalForPreTrainingOutput:
        input_shape = text_shape(input_ids, inputs_embeds) if (input_ids is None) != (inputs_embeds is None) else None
        if input_shape is not None:
            validate_pretraining_targets(self.config, labels, itm_labels, mlm_positions, input_shape)
            if anchor_pairs is None and anchor_concept_ids is None and anchor_actions is None and (
                    labels is not None or itm_labels is not None):
                # A training batch without anchor inputs: AMC runs on zero anchor rows (loss 0), so that its
                # parameters are in every step's graph, as DDP without find_unused_parameters requires.
                device = (input_ids if input_ids is not None else inputs_embeds).device
                anchor_pairs = torch.full((input_shape[0], 0, 2), -1, dtype=torch.long, device=device)
                anchor_concept_ids = torch.full((input_shape[0], 0), -1, dtype=torch.long, device=device)
        outputs = self.cmal(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
            anchor_pairs=anchor_pairs, anchor_concept_ids=anchor_concept_ids, anchor_actions=anchor_actions,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )
        sequence_output = outputs.last_hidden_state
        batch_size, text_length = input_shape
        config = self.config
        losses: dict[str, torch.Tensor] = {}
        amc_logits = amc_labels = amc_slot_is_text = mlm_logits = itm_logits = itc_logits = None
        amc_pairing_logits = amc_pairing_labels = amc_pairing_loss = None

        if self.amc_head is not None and anchor_pairs is not None:
            actions = anchor_actions if anchor_actions is not None else self.cmal.default_anchor_actions(anchor_pairs)
            concepts = anchor_concept_ids if anchor_concept_ids is not None else torch.full_like(actions, -100)
            positions, amc_labels, amc_slot_is_text = anchor_targets(anchor_pairs, actions, concepts, text_length)
            slots = sequence_output.gather(1, positions.unsqueeze(-1).expand(-1, -1, sequence_output.shape[-1]))
            amc_logits = self.amc_head(slots)
            region_mask = (visual_attention_mask if visual_attention_mask is not None
                           else torch.ones_like(outputs.image_embeds[..., 0], dtype=torch.long))
            amc_pairing_logits = self.amc_pairing_head(outputs.text_embeds, outputs.image_embeds, anchor_pairs,
                                                       region_mask)
            amc_pairing_labels = anchor_pairing_targets(anchor_pairs, actions)
            if anchor_concept_ids is not None:
                # Each modality's mean cross-entropy counts once (averaged over the modalities that have targets).
                per_slot = F.cross_entropy(amc_logits.flatten(0, 1).float(), amc_labels.flatten(), reduction="none",
                                           ignore_index=-100).view_as(amc_labels)
                has_target = amc_labels != -100
                text_side, region_side = has_target & amc_slot_is_text, has_target & ~amc_slot_is_text
                text_count, region_count = text_side.sum(), region_side.sum()
                sides = ((text_count > 0).to(per_slot.dtype) + (region_count > 0).to(per_slot.dtype)).clamp(min=1)
                concept_loss = ((per_slot * text_side).sum() / text_count.clamp(min=1)
                                + (per_slot * region_side).sum() / region_count.clamp(min=1)) / sides
                # The mapping term: each anchor word → its own region among the image's regions (hyperspheres).
                amc_pairing_loss = (_masked_mean_cross_entropy(amc_pairing_logits, amc_pairing_labels)
                                    if amc_pairing_logits.shape[-1] > 0 else 0.0 * amc_pairing_logits.sum())
                losses["amc"] = concept_loss + amc_pairing_loss

        if self.cls is not None:
            text_output = sequence_output[:, :text_length]
            if labels is not None and mlm_positions is not None:
                slots = text_output.gather(
                    1, mlm_positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, text_output.shape[-1]))
                slot_labels = labels.gather(1, mlm_positions.clamp(min=0))
                slot_labels = torch.where(mlm_positions >= 0, slot_labels, torch.full_like(slot_labels, -100))
                mlm_logits = self.cls(slots)
                losses["mlm"] = _masked_mean_cross_entropy(mlm_logits, slot_labels)
            else:
                mlm_logits = self.cls(text_output)
                if labels is not None:
                    losses["mlm"] = _masked_mean_cross_entropy(mlm_logits, labels)

        if self.itm_head is not None:
            itm_logits = self.itm_head(outputs.pooler_output)
            if itm_labels is not None:
                losses["itm"] = F.cross_entropy(itm_logits.float(), itm_labels)

        if self.itc_head is not None and itm_labels is not None:
            text_mask = (attention_mask if attention_mask is not None
                         else torch.ones_like(sequence_output[:, :text_length, 0]))
            region_mask = (
                visual_attention_mask if visual_attention_mask is not None
                else torch.ones_like(outputs.image_embeds[..., 0])
            )
            # Every rank runs the head (it gathers across processes), also when none of its pairs is matched.
            itc_logits, itc_logits_per_image, itc_targets = self.itc_head(
                outputs.text_embeds, text_mask, outputs.image_embeds, region_mask, itm_labels == 1
            )
            losses["itc"] = 0.5 * (_masked_mean_cross_entropy(itc_logits, itc_targets)
                                   + _masked_mean_cross_entropy(itc_logits_per_image, itc_targets))

        if self.mrfr_head is not None and (labels is not None or itm_labels is not None):
            # Every real region, masked or not: the target is the region's input, normalised per region (the
            # features' scale is the detector's), so the loss is comparable across corpora.
            num_regions = visual_feats.shape[1]
            predicted = self.mrfr_head(sequence_output[:, sequence_output.shape[1] - num_regions:]).float()
            target = F.layer_norm(visual_feats.float(), (visual_feats.shape[-1],))
            real = (visual_attention_mask if visual_attention_mask is not None
                    else torch.ones_like(visual_feats[..., 0])).to(predicted.dtype)
            per_region = (predicted - target).pow(2).mean(-1)
            losses["mrfr"] = (per_region * real).sum() / real.sum().clamp(min=1)

        weights = {"amc": config.amc_loss_weight, "mlm": config.mlm_loss_weight, "itm": config.itm_loss_weight,
                   "itc": config.itc_loss_weight, "mrfr": config.mrfr_loss_weight}
        loss = sum(weights[name] * value for name, value in losses.items()) if losses else None
        return CmalForPreTrainingOutput(
            loss=loss,
            amc_loss=losses.get("amc"),
            mlm_loss=losses.get("mlm"),
            itm_loss=losses.get("itm"),
            itc_loss=losses.get("itc"),
            mrfr_loss=losses.get("mrfr"),
            amc_logits=amc_logits,
            amc_labels=amc_labels,
            # 1 / 0 rather than bool, so that outputs compare and subtract like every other tensor output.
            amc_slot_is_text=amc_slot_is_text.long() if amc_slot_is_text is not None else None,
            amc_pairing_loss=amc_pairing_loss,
            amc_pairing_logits=amc_pairing_logits,
            amc_pairing_labels=amc_pairing_labels,
            mlm_logits=mlm_logits,
            itm_logits=itm_logits,
            itc_logits=itc_logits,
            text_embeds=outputs.text_embeds,
            image_embeds=outputs.image_embeds,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# --------------------------------------------------------------------------------------------------------------
# Task heads
# --------------------------------------------------------------------------------------------------------------
# Every head spells out the trunk's inputs in its own `forward` signature, as transformers' heads do: the signature
# is what the docs, `Trainer`'s column filtering (`remove_unused_columns`) and the pipelines read. The repetition
# between the heads' signatures and their `_trunk(...)` calls is deliberate; what they compute differently follows.


@dataclass
class CmalTaskOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*): returned when `labels` are given.
    logits (`torch.FloatTensor`): `(batch_size, num_labels)` for classification heads, `(batch_size, num_regions)`
        for referring expressions (padding regions get the dtype's minimum).
    pooler_output (`torch.FloatTensor`): what the head classified: `(batch_size, P)` (`CmalTaskPooler`: pooled
        `[CLS]` and slot summaries, P = its `output_size`, 3 * hidden_size by default) for VQA and SNLI-VE,
        `(batch_size, 2 * P)` for NLVR2 (both images),
        the trunk's pooled `[CLS]` `(batch_size, hidden_size)` for referring expressions and image-text matching.
    hidden_states / attentions: the unified encoder's, when asked for.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class CmalTaskPooler(nn.Module):
    """What a task head reads: the pooled `[CLS]` state together with summaries of the hybrid sequence, chosen by
    `config.task_pooling` (`output_size` is the width of the result):

    - `"text_and_anchored_words"` (`3 * hidden_size`): the mean of the real text slots, then the mean of the text
      slots of anchored words (every piece listed in `anchor_pairs`; zeros for a sample without anchors). Under the
      fill-text policy the anchored slots hold their regions' states, so "what color is the circle?" reaches the
      circle's region in one linear read; a word without anchor that pre-training routed to its region ("what shape
      is the red object?") reaches the head through the text mean. No weights of its own.
    - `"anchored_words"` (`2 * hidden_size`): the anchored-word mean only (folders saved on 2026-12-07).
    - `"cls_attention"` (`2 * hidden_size`): a summary of all slots, each attention head weighting them by their match
      with `[CLS]` (folders saved before 2026-12-07); it has the `query` and `key` projections.

    Measured on the synthetic VQA of the main job (750 fine-tuning steps, seed 0), pre-trained / scratch: "what shape
    is the ⟨colour⟩ object" 0.586 / 0.117 with `"text_and_anchored_words"`, 0.123 / 0.123 with `"anchored_words"`
    (the pooled `[CLS]` does not gather the routed word); docs/model.md has the table.
    """

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.task_pooling = config.task_pooling
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.output_size = (3 if self.task_pooling == "text_and_anchored_words" else 2) * config.hidden_size
        if self.task_pooling == "cls_attention":
            self.query = nn.Linear(config.hidden_size, config.hidden_size)
            self.key = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor, slot_mask: torch.Tensor,
                anchor_pairs: torch.Tensor | None, num_regions: int) -> torch.Tensor:
        """`sequence_output` `[B, N + M, H]` (N text slots, then `num_regions` = M region slots), `pooled_output`
        `[B, H]`, `slot_mask` `[B, N + M]` (1 real slot, 0 padding), `anchor_pairs` `[B, K, 2]` (-1 padding; None:
        no anchors) → `[B, output_size]`: the pooled output, then the summaries."""
        if self.task_pooling == "text_and_anchored_words":
            num_text = sequence_output.shape[1] - num_regions
            return torch.cat([pooled_output, self._masked_mean(sequence_output[:, :num_text], slot_mask[:, :num_text]),
                              self._anchored_word_mean(sequence_output, anchor_pairs)], dim=-1)
        if self.task_pooling == "anchored_words":
            return torch.cat([pooled_output, self._anchored_word_mean(sequence_output, anchor_pairs)], dim=-1)
        batch_size, length, hidden_size = sequence_output.shape
        query = self.query(sequence_output[:, 0]).view(batch_size, 1, self.num_heads, self.head_size)
        key = self.key(sequence_output).view(batch_size, length, self.num_heads, self.head_size)
        scores = (query * key).sum(-1) * self.head_size**-0.5  # [B, L, heads]
        scores = scores.masked_fill((slot_mask == 0).unsqueeze(-1), torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=1).unsqueeze(-1)  # over the slots
        values = sequence_output.view(batch_size, length, self.num_heads, self.head_size)
        summary = (weights * values).sum(1).reshape(batch_size, hidden_size)
        return torch.cat([pooled_output, summary], dim=-1)

    @staticmethod
    def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, H]`: the mean of `states` `[B, L, H]` over the slots where `mask` `[B, L]` is nonzero."""
        weights = mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1)

    @staticmethod
    def _anchored_word_mean(sequence_output: torch.Tensor, anchor_pairs: torch.Tensor | None) -> torch.Tensor:
        """`[B, H]`: the mean of the slots at the text positions of `anchor_pairs` (each slot once, however many
        rows name it), zeros where a sample has none."""
        batch_size, length = sequence_output.shape[:2]
        if anchor_pairs is None or anchor_pairs.shape[1] == 0:  # static shapes: no data-dependent branch
            return sequence_output.new_zeros(batch_size, sequence_output.shape[-1])
        positions = anchor_pairs[..., 0]
        counts = torch.zeros(batch_size, length, dtype=sequence_output.dtype, device=sequence_output.device)
        counts.scatter_add_(1, positions.clamp(min=0), (positions >= 0).to(sequence_output.dtype))
        weights = (counts > 0).to(sequence_output.dtype)
        return (sequence_output * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)


def _slot_mask(sequence_output: torch.Tensor, num_regions: int, attention_mask, visual_attention_mask) -> torch.Tensor:
    """The `[B, N + M]` mask of real slots of the hybrid sequence (every slot real where a mask is not given)."""
    batch_size, length = sequence_output.shape[:2]
    ones = partial(torch.ones, dtype=torch.long, device=sequence_output.device)
    text_mask = attention_mask if attention_mask is not None else ones(batch_size, length - num_regions)
    region_mask = visual_attention_mask if visual_attention_mask is not None else ones(batch_size, num_regions)
    return torch.cat([text_mask.to(torch.long), region_mask.to(torch.long)], dim=1)


class CmalClassificationHead(nn.Module):
    """`Linear(in, 2H) → activation (config.classifier_activation) → LayerNorm → dropout →
    Linear(2H, num_labels)`, the answer head of LXMERT/UNITER."""

    def __init__(self, config: CmalConfig, input_size: int, num_labels: int):
        super().__init__()
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(input_size, 2 * config.hidden_size)
        self.activation = ACT2FN[config.classifier_activation]
        self.LayerNorm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(2 * config.hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., input_size]` → `[..., num_labels]`."""
        return self.out_proj(self.dropout(self.LayerNorm(self.activation(self.dense(hidden_states)))))


def _trunk(model, inputs: dict, kwargs: dict) -> CmalModelOutput:
    """Runs `model.cmal` on the trunk's inputs (the output flags in `kwargs` pass through)."""
    return model.cmal(**inputs, return_dict=True, **kwargs)


def _trunk_arguments(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask,
                     anchor_pairs, anchor_concept_ids, anchor_actions, inputs_embeds) -> dict:
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
                anchor_pairs=anchor_pairs, anchor_concept_ids=anchor_concept_ids, anchor_actions=anchor_actions,
                inputs_embeds=inputs_embeds)


def classification_loss(model: PreTrainedModel, logits: torch.Tensor, labels: torch.Tensor | None
                        ) -> torch.Tensor | None:
    """The loss of a sequence-classification head (`model.loss_type = "ForSequenceClassification"`): transformers'
    own `ForSequenceClassificationLoss` (`model.loss_function`), which follows `config.problem_type`:
    `"single_label_classification"` (class ids `[B]`, cross-entropy, -100 ignored), `"multi_label_classification"`
    (`[B, num_labels]` targets in [0, 1], binary cross-entropy) or `"regression"` (`[B]` or `[B, num_labels]`
    values, mean squared error). Before it, the labels are checked against the problem type (a clear `ValueError`
    instead of a shape error deep in torch), which is inferred first when unset, as transformers does (1 label:
    regression; integer labels: single label; else multi label), and stored in the config once the labels are
    accepted. The logits go in as float32, for a loss that bf16 would round."""
    if labels is None:
        return None
    config = model.config
    problem_type = config.problem_type
    if problem_type is None:
        if logits.shape[-1] == 1:
            problem_type = "regression"
        elif isinstance(labels, torch.Tensor) and not labels.is_floating_point():
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    labels = validate_class_labels(problem_type, labels, logits)
    config.problem_type = problem_type
    return model.loss_function(labels, logits.float(), config)


class CmalForQuestionAnswering(CmalPreTrainedModel):
    """VQA: task pooler → answer logits over the answer vocabulary (`config.num_labels`, `config.id2label`).
    `labels` are soft scores `[B, num_labels]` in [0, 1]; the loss is binary cross-entropy summed over answers
    and averaged over the batch (as in LXMERT and UNITER)."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cmal = CmalModel(config)
        self.task_pooler = CmalTaskPooler(config)
        self.answer_head = CmalClassificationHead(config, self.task_pooler.output_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING + r"""
    labels (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        VQA soft scores in `[0, 1]` (binary cross-entropy per answer). `logits` are `(batch_size, num_labels)`.
    """)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.LongTensor | None = None,
        anchor_pairs: torch.LongTensor | None = None,
        anchor_concept_ids: torch.LongTensor | None = None,
        anchor_actions: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CmalTaskOutput:
        outputs = _trunk(self, _trunk_arguments(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos,
                                                visual_attention_mask, anchor_pairs, anchor_concept_ids,
                                                anchor_actions, inputs_embeds), kwargs)
        pooled = self.task_pooler(outputs.last_hidden_state, outputs.pooler_output,
                                  _slot_mask(outputs.last_hidden_state, visual_feats.shape[1], attention_mask,
                                             visual_attention_mask), anchor_pairs, num_regions=visual_feats.shape[1])
        logits = self.answer_head(pooled)
        loss = None
        if labels is not None:
            labels = validate_soft_scores(labels, logits)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum") / logits.shape[0]
        return CmalTaskOutput(loss=loss, logits=logits, pooler_output=pooled,
                              hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class CmalForVisualEntailment(CmalPreTrainedModel):
    """SNLI-VE (or any image-text pair classification): task pooler → `config.num_labels` classes (3 for
    entailment / neutral / contradiction). `labels` as transformers' sequence-classification heads take them,
    following `config.problem_type` (`classification_loss`): class ids `[B]` by default."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.loss_type = "ForSequenceClassification"  # transformers' loss of sequence-classification heads
        self.num_labels = config.num_labels
        self.cmal = CmalModel(config)
        self.task_pooler = CmalTaskPooler(config)
        self.classifier = CmalClassificationHead(config, self.task_pooler.output_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING + r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        Class ids, or what `config.problem_type` asks for (see the class docstring). `logits` are
        `(batch_size, num_labels)`.
    """)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.LongTensor | None = None,
        anchor_pairs: torch.LongTensor | None = None,
        anchor_concept_ids: torch.LongTensor | None = None,
        anchor_actions: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CmalTaskOutput:
        outputs = _trunk(self, _trunk_arguments(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos,
                                                visual_attention_mask, anchor_pairs, anchor_concept_ids,
                                                anchor_actions, inputs_embeds), kwargs)
        pooled = self.task_pooler(outputs.last_hidden_state, outputs.pooler_output,
                                  _slot_mask(outputs.last_hidden_state, visual_feats.shape[1], attention_mask,
                                             visual_attention_mask), anchor_pairs, num_regions=visual_feats.shape[1])
        logits = self.classifier(pooled)
        return CmalTaskOutput(loss=classification_loss(self, logits, labels), logits=logits,
                              pooler_output=pooled, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class CmalForVisualReasoning(CmalPreTrainedModel):
    """NLVR2: one sentence, two images. The trunk encodes (sentence, image 0) and (sentence, image 1); the two
    task-pooler outputs are concatenated and classified (`config.num_labels`, 2 = False / True; `labels` follow
    `config.problem_type` as in `CmalForVisualEntailment`).

    Visual inputs carry an image axis: `visual_feats` `[B, 2, M, Dv]`, `visual_pos` `[B, 2, M, 4]`,
    `visual_attention_mask` `[B, 2, M]`, `anchor_pairs` `[B, 2, K, 2]`, `anchor_concept_ids` and
    `anchor_actions` `[B, 2, K]`; text inputs `[B, N]` are shared by both images.
    """

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.loss_type = "ForSequenceClassification"  # transformers' loss of sequence-classification heads
        self.num_labels = config.num_labels
        self.cmal = CmalModel(config)
        self.task_pooler = CmalTaskPooler(config)
        self.classifier = CmalClassificationHead(config, 2 * self.task_pooler.output_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING + r"""
    visual_feats (`torch.FloatTensor` of shape `(batch_size, 2, num_regions, visual_feat_dim)`):
        The two images' region features; `visual_pos` `(batch_size, 2, num_regions, 4)`,
        `visual_attention_mask` `(batch_size, 2, num_regions)`, `anchor_pairs` `(batch_size, 2, num_anchor_rows,
        2)`, `anchor_concept_ids` and `anchor_actions` `(batch_size, 2, num_anchor_rows)` carry the same image
        axis; the text inputs are shared by both images.
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        Class ids (0 False, 1 True), or what `config.problem_type` asks for. `logits` are
        `(batch_size, num_labels)`.
    """)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.LongTensor | None = None,
        anchor_pairs: torch.LongTensor | None = None,
        anchor_concept_ids: torch.LongTensor | None = None,
        anchor_actions: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CmalTaskOutput:
        validate_image_pair_inputs(visual_feats, visual_pos, visual_attention_mask, anchor_pairs, anchor_concept_ids,
                                   anchor_actions)

        def per_image(tensor):
            return None if tensor is None else tensor.flatten(0, 1)

        def repeat_text(tensor):
            return None if tensor is None else tensor.repeat_interleave(2, dim=0)

        outputs = _trunk(self, _trunk_arguments(
            repeat_text(input_ids), repeat_text(attention_mask), repeat_text(token_type_ids), per_image(visual_feats),
            per_image(visual_pos), per_image(visual_attention_mask), per_image(anchor_pairs),
            per_image(anchor_concept_ids), per_image(anchor_actions), repeat_text(inputs_embeds)), kwargs)
        image_summaries = self.task_pooler(outputs.last_hidden_state, outputs.pooler_output,
                                           _slot_mask(outputs.last_hidden_state, visual_feats.shape[2],
                                                      repeat_text(attention_mask), per_image(visual_attention_mask)),
                                           per_image(anchor_pairs), num_regions=visual_feats.shape[2])
        pooled = image_summaries.view(visual_feats.shape[0], -1)
        logits = self.classifier(pooled)
        return CmalTaskOutput(loss=classification_loss(self, logits, labels), logits=logits,
                              pooler_output=pooled, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class CmalForReferringExpression(CmalPreTrainedModel):
    """RefCOCO+: a score per region from the unified encoder's region slots. `labels` `[B]` is the index of the
    referred region (cross-entropy over the real regions, -100 ignored); prediction = the region of highest score,
    whose box counts as correct at IoU ≥ 0.5 with the referred box. The trunk has no pooler here (nothing reads
    it)."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.cmal = CmalModel(config, add_pooling_layer=False)
        self.region_scorer = CmalClassificationHead(config, config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING + r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        The referred region's index. `logits` are `(batch_size, num_regions)`, padding regions at the dtype's
        minimum.
    """)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.LongTensor | None = None,
        anchor_pairs: torch.LongTensor | None = None,
        anchor_concept_ids: torch.LongTensor | None = None,
        anchor_actions: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CmalTaskOutput:
        outputs = _trunk(self, _trunk_arguments(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos,
                                                visual_attention_mask, anchor_pairs, anchor_concept_ids,
                                                anchor_actions, inputs_embeds), kwargs)
        num_regions = visual_feats.shape[1]
        sequence_output = outputs.last_hidden_state
        logits = self.region_scorer(sequence_output[:, sequence_output.shape[1] - num_regions:]).squeeze(-1)
        real = (visual_attention_mask if visual_attention_mask is not None
                else torch.ones_like(logits, dtype=torch.long)) != 0
        logits = logits.masked_fill(~real, torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None:
            validate_region_labels(labels, real)
            loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
        return CmalTaskOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class CmalForImageTextMatching(CmalPreTrainedModel):
    """Image-text matching and retrieval: the pre-training ITM head (`itm_head`, same name so that a pre-trained
    checkpoint gives zero-shot retrieval). `logits` `[B, 2]` (mismatch, match); `labels` `[B]` 1 = match."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.cmal = CmalModel(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    @auto_docstring(custom_args=CMAL_INPUTS_DOCSTRING + r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        1 when the text matches the image, 0 when it does not (-100 ignored). `logits` are `(batch_size, 2)`;
        `logits[:, 1] - logits[:, 0]` ranks pairs for retrieval.
    """)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.LongTensor | None = None,
        anchor_pairs: torch.LongTensor | None = None,
        anchor_concept_ids: torch.LongTensor | None = None,
        anchor_actions: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CmalTaskOutput:
        outputs = _trunk(self, _trunk_arguments(input_ids, attention_mask, token_type_ids, visual_feats, visual_pos,
                                                visual_attention_mask, anchor_pairs, anchor_concept_ids,
                                                anchor_actions, inputs_embeds), kwargs)
        logits = self.itm_head(outputs.pooler_output)
        loss = None
        if labels is not None:
            validate_match_labels(labels, logits.shape[0])
            loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
        return CmalTaskOutput(loss=loss, logits=logits, pooler_output=outputs.pooler_output,
                              hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# Written into every saved config, whatever head is saved, so that a folder loads any head with remote code. The
# Auto classes are the ones transformers gives its own vision-language models (ViLT, LXMERT, VisualBERT): the trunk,
# pre-training, visual question answering, and sequence classification for the pair classifier (SNLI-VE honours
# `config.problem_type` as transformers' sequence-classification heads do). The heads that fit no Auto class of
# transformers (NLVR2's two images, a score per region, image-text matching with 1 = match) are listed under their
# own names: load them with `get_class_from_dynamic_module(folder + "--modeling_cmal.<Name>")`, or through the
# pipelines.
CMAL_AUTO_MAP = {
    "AutoConfig": "configuration_cmal.CmalConfig",
    "AutoModel": "modeling_cmal.CmalModel",
    "AutoModelForPreTraining": "modeling_cmal.CmalForPreTraining",
    "AutoModelForVisualQuestionAnswering": "modeling_cmal.CmalForQuestionAnswering",
    "AutoModelForSequenceClassification": "modeling_cmal.CmalForVisualEntailment",
    "CmalForVisualReasoning": "modeling_cmal.CmalForVisualReasoning",
    "CmalForReferringExpression": "modeling_cmal.CmalForReferringExpression",
    "CmalForImageTextMatching": "modeling_cmal.CmalForImageTextMatching",
}


__all__ = [
    "CmalForPreTraining",
    "CmalForPreTrainingOutput",
    "CmalModel",
    "CmalModelOutput",
    "CmalPreTrainedModel",
]
