"""PyTorch CMAL model: Cross-Modal Associative Learning for vision-language pre-training (ACM MM 2022).

Data flow (see DESIGN.md): word pieces and detected regions are encoded by two uni-modal encoders whose outputs
are L2-normalised onto two hyperspheres (UMSE); at anchor pairs (a word and a region naming the same concept)
content is swapped between the modalities while every slot keeps its own position (CMAP); a unified encoder
runs over ``[CLS] text [SEP] regions`` (USE); the pre-training heads classify the anchor concept at the slots whose
own content was masked while their partner stayed in place (AMC: readable only through the other modality),
predict masked words (MLM) and tell matched from mismatched pairs (ITM). Task heads read the pooled `[CLS]` together
with an attention summary of every slot of the hybrid sequence (`CmalTaskPooler`).
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_cmal import ANCHOR_ACTIONS, CmalConfig

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
    amc_loss / mlm_loss / itm_loss / itc_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Each objective's unweighted loss.
    amc_logits (`torch.FloatTensor` of shape `(batch_size, num_anchor_rows, num_anchor_concepts)`):
        Concept logits at each anchor row's AMC slot (see `anchor_targets`): the word's first piece for *mask
        text*, the region slot for *mask region*.
    amc_labels (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`): the concept of each row that has an
        AMC target, -100 elsewhere (other pieces of a word, other actions, padding).
    amc_slot_is_text (`torch.BoolTensor` of shape `(batch_size, num_anchor_rows)`): rows whose target is a text
        slot.
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
    amc_logits: torch.FloatTensor | None = None
    amc_labels: torch.LongTensor | None = None
    amc_slot_is_text: torch.BoolTensor | None = None
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
    """Region embeddings: `LN(W_f feat) + LN(W_b geometry(box))`, dropout."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.feature_projection = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.feature_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, visual_feats: torch.Tensor, box_embeds: torch.Tensor) -> torch.Tensor:
        """`visual_feats` `[B, M, Dv]`, `box_embeds` `[B, M, H]` → `[B, M, H]`."""
        return self.dropout(self.feature_LayerNorm(self.feature_projection(visual_feats)) + box_embeds)


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
    """A stack of `num_layers` `CmalLayer`s; used for the text, region and unified encoders."""

    def __init__(self, config: CmalConfig, num_layers: int):
        super().__init__()
        self.layer = nn.ModuleList([CmalLayer(config) for _ in range(num_layers)])

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, output_hidden_states=False):
        """Returns (last hidden state `[B, L, H]`, all hidden states or None, all attentions or None)."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, attn_weights = layer(hidden_states, attention_mask, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions


# --------------------------------------------------------------------------------------------------------------
# UMSE → CMAP → hybrid sequence
# --------------------------------------------------------------------------------------------------------------


class CmalHypersphere(nn.Module):
    """Projects uni-modal states onto the unit hypersphere and keeps the learnable scale that restores their
    magnitude before fusion (one instance per modality)."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(math.sqrt(config.hidden_size)))

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
        """`text_content` `[B, N, H]`, `region_content` `[B, M, H]`, `anchor_pairs` `[B, K, 2]` (-1 padding),
        `anchor_actions` `[B, K]` → (text content `[B, N, H]`, region content `[B, M, H]`)."""
        # Under autocast the two encoders may return different dtypes (e.g. bf16 regions, float32 text after a
        # LayerNorm kept in float32): content moves between them, so both take the wider one.
        common = torch.promote_types(text_content.dtype, region_content.dtype)
        text_content, region_content = text_content.to(common), region_content.to(common)
        batch_size, text_length, hidden_size = text_content.shape
        num_regions = region_content.shape[1]
        pieces, regions = anchor_pairs[..., 0], anchor_pairs[..., 1]
        valid = pieces >= 0
        batch_index = torch.arange(batch_size, device=pieces.device).unsqueeze(1)
        text_slot = (batch_index * text_length + pieces.clamp(min=0))[valid]
        region_slot = (batch_index * num_regions + regions.clamp(min=0))[valid]
        actions = anchor_actions[valid]
        text_flat = text_content.reshape(-1, hidden_size)
        region_flat = region_content.reshape(-1, hidden_size)

        fill_text = actions == ACTION_FILL_TEXT
        fill_region = actions == ACTION_FILL_REGION
        mask_both = actions == ACTION_MASK_BOTH
        mask_text = fill_region | mask_both
        mask_region = fill_text | mask_both

        text_is_filled = torch.zeros(text_flat.shape[0], dtype=torch.bool, device=text_flat.device)
        text_is_filled[text_slot[fill_text]] = True
        text_is_masked = torch.zeros_like(text_is_filled)
        text_is_masked[text_slot[mask_text]] = True
        text_fill = torch.zeros_like(text_flat).index_copy(0, text_slot[fill_text], region_flat[region_slot[fill_text]])
        new_text = torch.where(text_is_filled[:, None], text_fill, text_flat)
        new_text = torch.where(text_is_masked[:, None], self.text_mask_embedding.to(new_text.dtype), new_text)

        # A word of several pieces fills its region with the mean of its pieces.
        region_sum = torch.zeros_like(region_flat).index_add(0, region_slot[fill_region], text_flat[text_slot[fill_region]])
        region_count = torch.zeros(region_flat.shape[0], dtype=region_flat.dtype, device=region_flat.device)
        region_count = region_count.index_add(0, region_slot[fill_region], torch.ones_like(region_slot[fill_region], dtype=region_flat.dtype))
        region_is_masked = torch.zeros(region_flat.shape[0], dtype=torch.bool, device=region_flat.device)
        region_is_masked[region_slot[mask_region]] = True
        new_region = torch.where(
            (region_count > 0)[:, None], region_sum / region_count.clamp(min=1)[:, None], region_flat
        )
        new_region = torch.where(region_is_masked[:, None], self.region_mask_embedding.to(new_region.dtype), new_region)
        return new_text.view_as(text_content), new_region.view_as(region_content)


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


# --------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------


def _check_shape(name: str, tensor: torch.Tensor | None, expected: tuple, description: str) -> None:
    """`expected` holds ints or None (any size)."""
    if tensor is None:
        return
    if tensor.dim() != len(expected) or any(e is not None and s != e for s, e in zip(tensor.shape, expected)):
        raise ValueError(f"{name} must have shape {description}, got {tuple(tensor.shape)}")


def validate_cmal_inputs(
    config: CmalConfig,
    input_ids,
    inputs_embeds,
    attention_mask,
    token_type_ids,
    visual_feats,
    visual_pos,
    visual_attention_mask,
    anchor_pairs,
    anchor_concept_ids,
    anchor_actions,
) -> None:
    """Raises `ValueError` naming the argument, the value and what was expected."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Give exactly one of input_ids [B, N] or inputs_embeds [B, N, H]")
    if visual_feats is None or visual_pos is None:
        raise ValueError("CMAL needs visual_feats [B, M, visual_feat_dim] and visual_pos [B, M, 4]")
    text = input_ids if input_ids is not None else inputs_embeds[..., 0]
    if text.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch_size, text_length], got {tuple(text.shape)}")
    batch_size, text_length = text.shape
    if text_length > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {text_length} pieces but config.max_position_embeddings is "
            f"{config.max_position_embeddings}"
        )
    if visual_feats.dim() != 3 or visual_feats.shape[-1] != config.visual_feat_dim:
        raise ValueError(
            f"visual_feats must have shape [batch_size, num_regions, {config.visual_feat_dim}] "
            f"(config.visual_feat_dim), got {tuple(visual_feats.shape)}"
        )
    if visual_feats.shape[0] != batch_size:
        raise ValueError(
            f"visual_feats has batch size {visual_feats.shape[0]} but input_ids has batch size {batch_size}"
        )
    num_regions = visual_feats.shape[1]
    _check_shape("attention_mask", attention_mask, (batch_size, text_length), f"[{batch_size}, {text_length}]")
    _check_shape("token_type_ids", token_type_ids, (batch_size, text_length), f"[{batch_size}, {text_length}]")
    _check_shape("visual_pos", visual_pos, (batch_size, num_regions, 4), f"[{batch_size}, {num_regions}, 4]")
    _check_shape(
        "visual_attention_mask", visual_attention_mask, (batch_size, num_regions), f"[{batch_size}, {num_regions}]"
    )
    if anchor_pairs is None:
        if anchor_actions is not None or anchor_concept_ids is not None:
            raise ValueError("anchor_actions and anchor_concept_ids need anchor_pairs [B, K, 2]")
        return
    _check_shape("anchor_pairs", anchor_pairs, (batch_size, None, 2), f"[{batch_size}, K, 2]")
    num_anchors = anchor_pairs.shape[1]
    _check_shape("anchor_actions", anchor_actions, (batch_size, num_anchors), f"[{batch_size}, {num_anchors}]")
    _check_shape(
        "anchor_concept_ids", anchor_concept_ids, (batch_size, num_anchors), f"[{batch_size}, {num_anchors}]"
    )
    if num_anchors == 0:
        return
    pieces, regions = anchor_pairs[..., 0], anchor_pairs[..., 1]
    padding = (pieces == -1) & (regions == -1)
    bad = ~padding & ((pieces < 0) | (pieces >= text_length) | (regions < 0) | (regions >= num_regions))
    if bad.any():
        b, k = bad.nonzero()[0].tolist()
        raise ValueError(
            f"anchor_pairs[{b}, {k}] = {anchor_pairs[b, k].tolist()} is out of range: expected a text piece position "
            f"in [0, {text_length}) and a region index in [0, {num_regions}), or [-1, -1] for padding"
        )
    if anchor_actions is not None:
        bad = (anchor_actions < 0) | (anchor_actions >= len(ANCHOR_ACTIONS))
        if bad.any():
            b, k = bad.nonzero()[0].tolist()
            raise ValueError(
                f"anchor_actions[{b}, {k}] = {anchor_actions[b, k].item()}; expected 0 (keep), 1 (fill text), "
                "2 (fill region), 3 (mask both), 4 (mask text) or 5 (mask region)"
            )
    if anchor_concept_ids is not None:
        bad = ~padding & ((anchor_concept_ids < 0) | (anchor_concept_ids >= config.num_anchor_concepts))
        if bad.any():
            b, k = bad.nonzero()[0].tolist()
            raise ValueError(
                f"anchor_concept_ids[{b}, {k}] = {anchor_concept_ids[b, k].item()}; expected a concept id in "
                f"[0, {config.num_anchor_concepts}) (config.num_anchor_concepts must equal the lexicon size)"
            )


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class CmalPreTrainedModel(PreTrainedModel):
    config: CmalConfig
    config_class = CmalConfig
    base_model_prefix = "cmal"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CmalLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CmalTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, CmalHypersphere):
            init.constant_(module.scale, math.sqrt(self.config.hidden_size))
        elif isinstance(module, CmalAssociativePrompt):
            init.normal_(module.text_mask_embedding, std=self.config.initializer_range)
            init.normal_(module.region_mask_embedding, std=self.config.initializer_range)
        elif isinstance(module, CmalLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, CmalAnchorPairingHead):
            init.constant_(module.logit_scale, math.log(1 / self.config.anchor_pairing_temperature))
        elif isinstance(module, CmalContrastiveHead):
            init.constant_(module.logit_scale, math.log(1 / 0.07))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, plus the `auto_map` of every CMAL head and the code files, so the
        folder loads as any head with `trust_remote_code=True` where this package is not installed."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **CMAL_AUTO_MAP}
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is None:
            # Heads without a transformers Auto class (NLVR2) are not copied by transformers itself.
            for module_name in (type(self).__module__, type(self.config).__module__):
                shutil.copy(sys.modules[module_name].__file__, save_directory)


class CmalModel(CmalPreTrainedModel):
    """The CMAL trunk: UMSE (text and region encoders on two hyperspheres), CMAP (anchor swap filling) and USE
    (unified encoder + pooler)."""

    def __init__(self, config: CmalConfig):
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
        self.pooler = CmalPooler(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_embeddings.word_embeddings = value

    def default_anchor_actions(self, anchor_pairs: torch.Tensor) -> torch.Tensor:
        """`config.default_anchor_action` for every row of `anchor_pairs` `[B, K, 2]` → `[B, K]`."""
        action = ANCHOR_ACTIONS.index(self.config.default_anchor_action)
        return torch.full(anchor_pairs.shape[:2], action, dtype=torch.long, device=anchor_pairs.device)

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
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CmalModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`): word pieces `[CLS] ... [SEP]`.
            attention_mask (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*): 1 real, 0 pad.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*).
            visual_feats (`torch.FloatTensor` of shape `(batch_size, num_regions, visual_feat_dim)`).
            visual_pos (`torch.FloatTensor` of shape `(batch_size, num_regions, 4)`): boxes `x1, y1, x2, y2`
                normalised to `[0, 1]`.
            visual_attention_mask (`torch.LongTensor` of shape `(batch_size, num_regions)`, *optional*).
            anchor_pairs (`torch.LongTensor` of shape `(batch_size, num_anchor_rows, 2)`, *optional*): rows
                `(text piece position, region index)`, `[-1, -1]` for padding; a word of several pieces gives one
                row per piece.
            anchor_concept_ids (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`, *optional*): the
                concept of each row (AMC targets; only validated here).
            anchor_actions (`torch.LongTensor` of shape `(batch_size, num_anchor_rows)`, *optional*): 0 keep,
                1 fill text, 2 fill region, 3 mask both, 4 mask text, 5 mask region; defaults to
                `config.default_anchor_action` (the one policy of fine-tuning and inference).
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, text_length, hidden_size)`, *optional*):
                instead of `input_ids`.
            output_attentions / output_hidden_states / return_dict (`bool`, *optional*).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        validate_cmal_inputs(
            self.config, input_ids, inputs_embeds, attention_mask, token_type_ids, visual_feats, visual_pos,
            visual_attention_mask, anchor_pairs, anchor_concept_ids, anchor_actions,
        )
        text = input_ids if input_ids is not None else inputs_embeds[..., 0]
        batch_size, text_length = text.shape
        num_regions = visual_feats.shape[1]
        device = text.device
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, text_length, dtype=torch.long, device=device)
        if visual_attention_mask is None:
            visual_attention_mask = torch.ones(batch_size, num_regions, dtype=torch.long, device=device)

        # UMSE: two uni-modal encoders, outputs on two hyperspheres.
        text_hidden = self.text_embeddings(input_ids, token_type_ids, inputs_embeds)
        text_mask = create_bidirectional_mask(self.config, text_hidden, attention_mask)
        text_hidden, text_hidden_states, text_attentions = self.text_encoder(
            text_hidden, text_mask, output_attentions, output_hidden_states
        )
        text_embeds, text_content = self.text_hypersphere(text_hidden)

        visual_feats = visual_feats.to(text_hidden.dtype)
        box_embeds = self.box_embeddings(visual_pos.to(text_hidden.dtype))
        region_hidden = self.visual_embeddings(visual_feats, box_embeds)
        # An image without regions would leave its attention rows empty (NaN in sdpa); its slots stay masked in the
        # unified encoder, so letting them attend to each other here changes nothing downstream.
        no_region = visual_attention_mask.sum(dim=1, keepdim=True) == 0
        region_mask = create_bidirectional_mask(
            self.config, region_hidden, torch.where(no_region, torch.ones_like(visual_attention_mask), visual_attention_mask)
        ) if num_regions > 0 else None
        region_hidden, vision_hidden_states, vision_attentions = self.visual_encoder(
            region_hidden, region_mask, output_attentions, output_hidden_states
        )
        image_embeds, region_content = self.visual_hypersphere(region_hidden)

        # CMAP: swap filling at anchors; positions stay with their slots.
        if anchor_pairs is not None and anchor_pairs.shape[1] > 0:
            if anchor_actions is None:
                anchor_actions = self.default_anchor_actions(anchor_pairs)
            text_content, region_content = self.associative_prompt(
                text_content, region_content, anchor_pairs, anchor_actions
            )
        text_position_embeds = self.text_embeddings.position_embeddings(
            self.text_embeddings.position_ids[:, :text_length]
        )
        hybrid = self.hybrid_embeddings(text_content, text_position_embeds, region_content, box_embeds)

        # USE: unified encoder over [CLS] text [SEP] regions.
        hybrid_mask = create_bidirectional_mask(
            self.config, hybrid, torch.cat([attention_mask, visual_attention_mask.to(attention_mask.dtype)], dim=1)
        )
        sequence_output, hidden_states, attentions = self.unified_encoder(
            hybrid, hybrid_mask, output_attentions, output_hidden_states
        )
        pooled_output = self.pooler(sequence_output)

        output = CmalModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_hidden_states=text_hidden_states,
            vision_hidden_states=vision_hidden_states,
            hidden_states=hidden_states,
            text_attentions=text_attentions,
            vision_attentions=vision_attentions,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


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


def _gather_pairs_across_processes(pairs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' valid rows of `pairs` `[B, D]` (`valid` `[B]` bool), in rank order, with gradients flowing back
    to every process; plus the number of valid rows on the ranks before this one (its offset in the result).

    `all_gather` needs equal sizes on every rank, but neither the batch size (last batch) nor the number of valid
    rows (matched pairs) is the same everywhere: every rank pads its rows to the largest batch, gathers them with
    their validity, and drops the padding and the invalid rows afterwards.
    """
    from torch.distributed.nn.functional import all_gather

    world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    batch_sizes = [torch.zeros(1, dtype=torch.long, device=pairs.device) for _ in range(world_size)]
    torch.distributed.all_gather(batch_sizes, torch.tensor([pairs.shape[0]], device=pairs.device))
    batch_sizes = [int(size.item()) for size in batch_sizes]
    padding = max(batch_sizes) - pairs.shape[0]
    # The validity travels as the last column, so one gather (with gradients) carries everything.
    rows = torch.cat([pairs, valid.to(pairs.dtype).unsqueeze(-1)], dim=-1)
    gathered = all_gather(F.pad(rows, (0, 0, 0, padding)))
    gathered = [part[:size] for part, size in zip(gathered, batch_sizes)]
    offset = int(sum((part[:, -1] > 0).sum().item() for part in gathered[:rank]))
    gathered = torch.cat(gathered, dim=0)
    return gathered[gathered[:, -1] > 0, :-1], offset


class CmalContrastiveHead(nn.Module):
    """ITC (ablation baseline): symmetric InfoNCE between the mean-pooled text and region hypersphere embeddings
    of matched pairs, with a learnable temperature; in-batch negatives are the matched pairs of every process."""

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @staticmethod
    def _pool(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(embeds.dtype).unsqueeze(-1)
        return F.normalize((embeds * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)

    def forward(self, text_embeds, attention_mask, image_embeds, visual_attention_mask, pair_mask=None):
        """`text_embeds` `[B, N, H]`, `attention_mask` `[B, N]`, `image_embeds` `[B, M, H]`, `visual_attention_mask`
        `[B, M]`, `pair_mask` `[B]` bool (the matched pairs; default all) → (text-to-image logits `[P, G]`,
        image-to-text logits `[P, G]`, targets `[P]`): `P` local matched pairs, `G` matched pairs of all processes
        in rank order; `targets` is each local pair's column."""
        if pair_mask is None:
            pair_mask = torch.ones(text_embeds.shape[0], dtype=torch.bool, device=text_embeds.device)
        text = self._pool(text_embeds, attention_mask)
        image = self._pool(image_embeds, visual_attention_mask)
        all_text, all_image, offset = text[pair_mask], image[pair_mask], 0
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            gathered, offset = _gather_pairs_across_processes(torch.cat([text, image], dim=-1), pair_mask)
            all_text, all_image = gathered.split(text.shape[-1], dim=-1)
        scale = self.logit_scale.exp().clamp(max=100)
        logits_per_text = scale * text[pair_mask] @ all_image.t()
        logits_per_image = scale * image[pair_mask] @ all_text.t()
        targets = torch.arange(logits_per_text.shape[0], device=text.device) + offset
        return logits_per_text, logits_per_image, targets


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
    """CMAL with its pre-training objectives: AMC (mapping + concept), MLM (tied decoder) and ITM (+ optional ITC)."""

    _tied_weights_keys = {"cls.decoder.weight": "cmal.text_embeddings.word_embeddings.weight",
                          "cls.decoder.bias": "cls.bias"}

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.cmal = CmalModel(config)
        self.cls = CmalLMPredictionHead(config)
        self.amc_head = CmalConceptHead(config)
        self.amc_pairing_head = CmalAnchorPairingHead(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        # Created only when used, so that a switched-off contrastive objective has no parameters at all.
        self.itc_head = CmalContrastiveHead(config) if config.itc_loss_weight > 0 else None
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.decoder = new_embeddings
        self.cls.bias = new_embeddings.bias

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
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CmalForPreTrainingOutput | tuple:
        r"""
        Inputs as [`CmalModel`], plus:
            labels (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*): MLM targets, -100 ignored.
            itm_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): 1 the caption matches the image,
                0 it does not.
        AMC needs no extra labels (its loss is computed when `anchor_concept_ids` are given): its concept term
        classifies `anchor_concept_ids` at the *mask text* and *mask region* anchors (`anchor_targets`), its mapping
        term maps every other anchor word to its own region (`anchor_pairing_targets`); `amc_loss` is their sum.
        Each objective's loss is computed when its targets are present and its config weight is > 0;
        `loss` is their weighted sum. ITC (when `config.itc_loss_weight > 0`) is computed whenever `itm_labels`
        are given, over the pairs with `itm_labels == 1`, symmetric (mean of the text-to-image and image-to-text
        cross-entropies), with the matched pairs of every process as negatives.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and labels.shape != (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape:
            raise ValueError(f"labels must have the shape of input_ids, got {tuple(labels.shape)}")
        outputs = self.cmal(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
            anchor_pairs=anchor_pairs, anchor_concept_ids=anchor_concept_ids, anchor_actions=anchor_actions,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        if itm_labels is not None and itm_labels.shape != (outputs.pooler_output.shape[0],):
            raise ValueError(
                f"itm_labels must have shape [{outputs.pooler_output.shape[0]}], got {tuple(itm_labels.shape)}"
            )
        sequence_output = outputs.last_hidden_state
        text_length = sequence_output.shape[1] - outputs.image_embeds.shape[1]
        config = self.config
        losses: dict[str, torch.Tensor] = {}
        # Heads that had no target in this batch (no AMC slot, no masked piece): their empty outputs join the total
        # loss times zero, so that every parameter is in the graph and DDP does not wait for missing gradients.
        unused_heads: list[torch.Tensor] = []
        amc_logits = amc_labels = amc_slot_is_text = mlm_logits = itm_logits = itc_logits = None
        amc_pairing_logits = amc_pairing_labels = amc_pairing_loss = None

        if config.amc_loss_weight > 0 and anchor_pairs is not None and anchor_pairs.shape[1] > 0:
            actions = anchor_actions if anchor_actions is not None else self.cmal.default_anchor_actions(anchor_pairs)
            concepts = anchor_concept_ids if anchor_concept_ids is not None else torch.full_like(actions, -100)
            positions, amc_labels, amc_slot_is_text = anchor_targets(anchor_pairs, actions, concepts, text_length)
            slots = sequence_output.gather(1, positions.unsqueeze(-1).expand(-1, -1, sequence_output.shape[-1]))
            amc_logits = self.amc_head(slots)
            if anchor_concept_ids is not None:
                # Each modality's mean cross-entropy counts once (averaged over the modalities that have targets).
                per_slot = F.cross_entropy(amc_logits.flatten(0, 1).float(), amc_labels.flatten(), reduction="none",
                                           ignore_index=-100).view_as(amc_labels)
                has_target = amc_labels != -100
                side_means, sides = [], 0
                for side in (has_target & amc_slot_is_text, has_target & ~amc_slot_is_text):
                    count = side.sum()
                    side_means.append((per_slot * side).sum() / count.clamp(min=1))
                    sides = sides + (count > 0).to(per_slot.dtype)
                amc_terms = []
                if has_target.any():
                    amc_terms.append((side_means[0] + side_means[1]) / sides)
                else:
                    unused_heads.append(amc_logits)
                # The mapping term: each anchor word → its own region among the image's regions (hyperspheres).
                amc_pairing_labels = anchor_pairing_targets(anchor_pairs, actions)
                region_mask = (visual_attention_mask if visual_attention_mask is not None
                               else torch.ones_like(outputs.image_embeds[..., 0], dtype=torch.long))
                amc_pairing_logits = self.amc_pairing_head(outputs.text_embeds, outputs.image_embeds, anchor_pairs,
                                                           region_mask)
                if (amc_pairing_labels != -100).any():
                    amc_pairing_loss = F.cross_entropy(amc_pairing_logits.flatten(0, 1).float(),
                                                       amc_pairing_labels.flatten(), ignore_index=-100)
                    amc_terms.append(amc_pairing_loss)
                else:
                    unused_heads.append(amc_pairing_logits)
                if amc_terms:
                    losses["amc"] = sum(amc_terms)

        if config.mlm_loss_weight > 0:
            text_output = sequence_output[:, :text_length]
            if labels is not None:
                labelled = labels != -100
                mlm_logits = self.cls(text_output[labelled])
                if mlm_logits.shape[0] > 0:
                    losses["mlm"] = F.cross_entropy(mlm_logits.float(), labels[labelled])
                else:
                    unused_heads.append(mlm_logits)
            else:
                mlm_logits = self.cls(text_output)

        if config.itm_loss_weight > 0:
            itm_logits = self.itm_head(outputs.pooler_output)
            if itm_labels is not None:
                losses["itm"] = F.cross_entropy(itm_logits.float(), itm_labels)

        if self.itc_head is not None:
            matched = itm_labels == 1 if itm_labels is not None else torch.ones_like(outputs.pooler_output[:, 0], dtype=torch.bool)
            text_mask = attention_mask if attention_mask is not None else torch.ones_like(sequence_output[:, :text_length, 0])
            region_mask = (
                visual_attention_mask if visual_attention_mask is not None
                else torch.ones_like(outputs.image_embeds[..., 0])
            )
            # Every rank runs the head (it gathers across processes), also when none of its pairs is matched.
            itc_logits, itc_logits_per_image, itc_targets = self.itc_head(
                outputs.text_embeds, text_mask, outputs.image_embeds, region_mask, matched
            )
            if itm_labels is not None and itc_logits.shape[0] > 0:
                losses["itc"] = 0.5 * (F.cross_entropy(itc_logits.float(), itc_targets)
                                       + F.cross_entropy(itc_logits_per_image.float(), itc_targets))
            elif itm_labels is not None:
                # The backward of the gather is a collective: this rank must take part in it.
                unused_heads += [itc_logits, itc_logits_per_image]

        weights = {"amc": config.amc_loss_weight, "mlm": config.mlm_loss_weight, "itm": config.itm_loss_weight,
                   "itc": config.itc_loss_weight}
        loss = None
        if losses:
            loss = sum(weights[name] * value for name, value in losses.items())
            loss = loss + sum(0.0 * head_output.sum() for head_output in unused_heads)
        output = CmalForPreTrainingOutput(
            loss=loss,
            amc_loss=losses.get("amc"),
            mlm_loss=losses.get("mlm"),
            itm_loss=losses.get("itm"),
            itc_loss=losses.get("itc"),
            amc_logits=amc_logits,
            amc_labels=amc_labels,
            amc_slot_is_text=amc_slot_is_text,
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
        return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------------------------------------------
# Task heads
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CmalTaskOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*): returned when `labels` are given.
    logits (`torch.FloatTensor`): `(batch_size, num_labels)` for classification heads, `(batch_size, num_regions)`
        for referring expressions (padding regions get the dtype's minimum).
    pooler_output (`torch.FloatTensor`): what the head classified: `(batch_size, 2 * hidden_size)` (`CmalTaskPooler`:
        pooled `[CLS]` and slot summary) for VQA and SNLI-VE, `(batch_size, 4 * hidden_size)` for NLVR2 (both images),
        the trunk's pooled `[CLS]` `(batch_size, hidden_size)` for referring expressions and image-text matching.
    hidden_states / attentions: the unified encoder's, when asked for.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class CmalTaskPooler(nn.Module):
    """What a task head reads: the pooled `[CLS]` state together with a summary of the whole hybrid sequence, each
    attention head of the summary weighting the slots by their match with the `[CLS]` state.

    Measured on the synthetic world: a head that reads only the pooled `[CLS]` does not learn to route a question
    word to the region it names at small scale (VQA stays at the answer prior, from scratch and pre-trained alike),
    while the information is linearly readable at the slots; the summary lets the head reach the slot that holds
    it (the region a question names, the filled word).
    """

    def __init__(self, config: CmalConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor,
                slot_mask: torch.Tensor) -> torch.Tensor:
        """`sequence_output` `[B, L, H]`, `pooled_output` `[B, H]`, `slot_mask` `[B, L]` (1 real slot, 0 padding)
        → `[B, 2H]`: the pooled output, then the summary."""
        batch_size, length, hidden_size = sequence_output.shape
        query = self.query(sequence_output[:, 0]).view(batch_size, 1, self.num_heads, self.head_size)
        key = self.key(sequence_output).view(batch_size, length, self.num_heads, self.head_size)
        scores = (query * key).sum(-1) * self.head_size**-0.5  # [B, L, heads]
        scores = scores.masked_fill((slot_mask == 0).unsqueeze(-1), torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=1).unsqueeze(-1)  # over the slots
        values = sequence_output.view(batch_size, length, self.num_heads, self.head_size)
        summary = (weights * values).sum(1).reshape(batch_size, hidden_size)
        return torch.cat([pooled_output, summary], dim=-1)


def _slot_mask(sequence_output: torch.Tensor, num_regions: int, attention_mask, visual_attention_mask) -> torch.Tensor:
    """The `[B, N + M]` mask of real slots of the hybrid sequence (every slot real where a mask is not given)."""
    batch_size, length = sequence_output.shape[:2]
    ones = partial(torch.ones, dtype=torch.long, device=sequence_output.device)
    text_mask = attention_mask if attention_mask is not None else ones(batch_size, length - num_regions)
    region_mask = visual_attention_mask if visual_attention_mask is not None else ones(batch_size, num_regions)
    return torch.cat([text_mask.to(torch.long), region_mask.to(torch.long)], dim=1)


class CmalClassificationHead(nn.Module):
    """`Linear(in, 2H) → GELU → LayerNorm → dropout → Linear(2H, num_labels)`, the answer head of LXMERT/UNITER."""

    def __init__(self, config: CmalConfig, input_size: int, num_labels: int):
        super().__init__()
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(input_size, 2 * config.hidden_size)
        self.activation = ACT2FN["gelu"]
        self.LayerNorm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(2 * config.hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., input_size]` → `[..., num_labels]`."""
        return self.out_proj(self.dropout(self.LayerNorm(self.activation(self.dense(hidden_states)))))


def _trunk_inputs(**inputs) -> dict:
    return {key: value for key, value in inputs.items() if value is not None}


class CmalForQuestionAnswering(CmalPreTrainedModel):
    """VQA: pooled output → answer logits over the answer vocabulary (`config.num_labels`, `config.id2label`).
    `labels` are soft scores `[B, num_labels]` in [0, 1]; the loss is binary cross-entropy summed over answers
    and averaged over the batch (as in LXMERT and UNITER)."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cmal = CmalModel(config)
        self.task_pooler = CmalTaskPooler(config)
        self.answer_head = CmalClassificationHead(config, 2 * config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, visual_feats=None, visual_pos=None,
        visual_attention_mask=None, anchor_pairs=None, anchor_concept_ids=None, anchor_actions=None, labels=None,
        inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs,
    ) -> CmalTaskOutput | tuple:
        r"""Inputs as [`CmalModel`]; `labels` (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        VQA soft scores. Returns `logits` `(batch_size, num_labels)`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.cmal(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
            anchor_pairs=anchor_pairs, anchor_concept_ids=anchor_concept_ids, anchor_actions=anchor_actions,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        pooled = self.task_pooler(outputs.last_hidden_state, outputs.pooler_output,
                                  _slot_mask(outputs.last_hidden_state, visual_feats.shape[1], attention_mask,
                                             visual_attention_mask))
        logits = self.answer_head(pooled)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"labels must be soft scores of shape {tuple(logits.shape)} (batch, num_labels), got {tuple(labels.shape)}"
                )
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum") / logits.shape[0]
        output = CmalTaskOutput(loss=loss, logits=logits, pooler_output=pooled,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


class CmalForVisualEntailment(CmalPreTrainedModel):
    """SNLI-VE (or any image-text pair classification): pooled output → `config.num_labels` classes (3 for
    entailment / neutral / contradiction). `labels` `[B]` class ids, cross-entropy."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cmal = CmalModel(config)
        self.task_pooler = CmalTaskPooler(config)
        self.classifier = CmalClassificationHead(config, 2 * config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, visual_feats=None, visual_pos=None,
        visual_attention_mask=None, anchor_pairs=None, anchor_concept_ids=None, anchor_actions=None, labels=None,
        inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs,
    ) -> CmalTaskOutput | tuple:
        r"""Inputs as [`CmalModel`]; `labels` (`torch.LongTensor` of shape `(batch_size,)`, *optional*).
        Returns `logits` `(batch_size, num_labels)`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.cmal(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
            anchor_pairs=anchor_pairs, anchor_concept_ids=anchor_concept_ids, anchor_actions=anchor_actions,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        pooled = self.task_pooler(outputs.last_hidden_state, outputs.pooler_output,
                                  _slot_mask(outputs.last_hidden_state, visual_feats.shape[1], attention_mask,
                                             visual_attention_mask))
        logits = self.classifier(pooled)
        loss = _classification_loss(logits, labels)
        output = CmalTaskOutput(loss=loss, logits=logits, pooler_output=pooled,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    if labels is None:
        return None
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape [{logits.shape[0]}] (one class id per sample), got {tuple(labels.shape)}")
    if ((labels < 0) | (labels >= logits.shape[-1])).any():
        raise ValueError(f"labels must be class ids in [0, {logits.shape[-1]}), got {labels.tolist()}")
    return F.cross_entropy(logits.float(), labels)


class CmalForVisualReasoning(CmalPreTrainedModel):
    """NLVR2: one sentence, two images. The trunk encodes (sentence, image 0) and (sentence, image 1); the two
    pooled outputs are concatenated and classified (`config.num_labels`, 2 = False / True).

    Visual inputs carry an image axis: `visual_feats` `[B, 2, M, Dv]`, `visual_pos` `[B, 2, M, 4]`,
    `visual_attention_mask` `[B, 2, M]`, `anchor_pairs` `[B, 2, K, 2]`, `anchor_concept_ids` and
    `anchor_actions` `[B, 2, K]`; text inputs `[B, N]` are shared by both images.
    """

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cmal = CmalModel(config)
        self.task_pooler = CmalTaskPooler(config)
        self.classifier = CmalClassificationHead(config, 4 * config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, visual_feats=None, visual_pos=None,
        visual_attention_mask=None, anchor_pairs=None, anchor_concept_ids=None, anchor_actions=None, labels=None,
        inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs,
    ) -> CmalTaskOutput | tuple:
        r"""See the class docstring for shapes; `labels` (`torch.LongTensor` of shape `(batch_size,)`, *optional*).
        Returns `logits` `(batch_size, num_labels)`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if visual_feats is None or visual_feats.dim() != 4 or visual_feats.shape[1] != 2:
            shape = None if visual_feats is None else tuple(visual_feats.shape)
            raise ValueError(f"visual_feats must have shape [batch_size, 2, num_regions, visual_feat_dim], got {shape}")

        def per_image(tensor):
            return None if tensor is None else tensor.flatten(0, 1)

        def repeat_text(tensor):
            return None if tensor is None else tensor.repeat_interleave(2, dim=0)

        outputs = self.cmal(
            input_ids=repeat_text(input_ids), attention_mask=repeat_text(attention_mask),
            token_type_ids=repeat_text(token_type_ids), visual_feats=per_image(visual_feats),
            visual_pos=per_image(visual_pos), visual_attention_mask=per_image(visual_attention_mask),
            anchor_pairs=per_image(anchor_pairs), anchor_concept_ids=per_image(anchor_concept_ids),
            anchor_actions=per_image(anchor_actions), inputs_embeds=repeat_text(inputs_embeds),
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        image_summaries = self.task_pooler(outputs.last_hidden_state, outputs.pooler_output,
                                           _slot_mask(outputs.last_hidden_state, visual_feats.shape[2],
                                                      repeat_text(attention_mask), per_image(visual_attention_mask)))
        pooled = image_summaries.view(visual_feats.shape[0], -1)
        logits = self.classifier(pooled)
        loss = _classification_loss(logits, labels)
        output = CmalTaskOutput(loss=loss, logits=logits, pooler_output=pooled,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


class CmalForReferringExpression(CmalPreTrainedModel):
    """RefCOCO+: a score per region from the unified encoder's region slots. `labels` `[B]` is the index of the
    referred region (cross-entropy over the real regions); prediction = the region of highest score, whose box
    counts as correct at IoU ≥ 0.5 with the referred box."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.cmal = CmalModel(config)
        self.region_scorer = CmalClassificationHead(config, config.hidden_size, 1)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, visual_feats=None, visual_pos=None,
        visual_attention_mask=None, anchor_pairs=None, anchor_concept_ids=None, anchor_actions=None, labels=None,
        inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs,
    ) -> CmalTaskOutput | tuple:
        r"""Inputs as [`CmalModel`]; `labels` (`torch.LongTensor` of shape `(batch_size,)`, *optional*): referred
        region index. Returns `logits` `(batch_size, num_regions)`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.cmal(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
            anchor_pairs=anchor_pairs, anchor_concept_ids=anchor_concept_ids, anchor_actions=anchor_actions,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        num_regions = visual_feats.shape[1]
        region_states = outputs.last_hidden_state[:, -num_regions:] if num_regions else outputs.last_hidden_state[:, :0]
        logits = self.region_scorer(region_states).squeeze(-1)
        if visual_attention_mask is not None:
            logits = logits.masked_fill(visual_attention_mask == 0, torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None:
            loss = _classification_loss(logits, labels)
            if visual_attention_mask is not None and (visual_attention_mask.gather(1, labels[:, None]) == 0).any():
                raise ValueError("labels must point at real regions (visual_attention_mask == 1), got a padding region")
        output = CmalTaskOutput(loss=loss, logits=logits, pooler_output=outputs.pooler_output,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


class CmalForImageTextMatching(CmalPreTrainedModel):
    """Image-text matching and retrieval: the pre-training ITM head (`itm_head`, same name so that a pre-trained
    checkpoint gives zero-shot retrieval). `logits` `[B, 2]` (mismatch, match); `labels` `[B]` 1 = match."""

    def __init__(self, config: CmalConfig):
        super().__init__(config)
        self.cmal = CmalModel(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, visual_feats=None, visual_pos=None,
        visual_attention_mask=None, anchor_pairs=None, anchor_concept_ids=None, anchor_actions=None, labels=None,
        inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs,
    ) -> CmalTaskOutput | tuple:
        r"""Inputs as [`CmalModel`]; `labels` (`torch.LongTensor` of shape `(batch_size,)`, *optional*).
        Returns `logits` `(batch_size, 2)`; `logits[:, 1] - logits[:, 0]` ranks pairs for retrieval."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.cmal(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            visual_feats=visual_feats, visual_pos=visual_pos, visual_attention_mask=visual_attention_mask,
            anchor_pairs=anchor_pairs, anchor_concept_ids=anchor_concept_ids, anchor_actions=anchor_actions,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.itm_head(outputs.pooler_output)
        loss = _classification_loss(logits, labels)
        output = CmalTaskOutput(loss=loss, logits=logits, pooler_output=outputs.pooler_output,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


# Written into every saved config, whatever head is saved, so that a folder loads any head with remote code.
# NLVR2 has no fitting transformers Auto class; it is listed under its own name (load it with
# `get_class_from_dynamic_module`, or through the `cmal-visual-reasoning` pipeline).
CMAL_AUTO_MAP = {
    "AutoConfig": "configuration_cmal.CmalConfig",
    "AutoModel": "modeling_cmal.CmalModel",
    "AutoModelForPreTraining": "modeling_cmal.CmalForPreTraining",
    "AutoModelForVisualQuestionAnswering": "modeling_cmal.CmalForQuestionAnswering",
    "AutoModelForSequenceClassification": "modeling_cmal.CmalForVisualEntailment",
    "AutoModelForTokenClassification": "modeling_cmal.CmalForReferringExpression",
    "AutoModelForNextSentencePrediction": "modeling_cmal.CmalForImageTextMatching",
    "CmalForVisualReasoning": "modeling_cmal.CmalForVisualReasoning",
}


# --------------------------------------------------------------------------------------------------------------
# BERT → CMAL weight conversion
# --------------------------------------------------------------------------------------------------------------


def bert_to_cmal_key_mapping(config: CmalConfig, num_bert_layers: int, prefix: str = "cmal.") -> dict[str, str]:
    """Explicit mapping from BERT parameter-name prefixes to CMAL ones: embeddings → text embeddings, BERT layers
    `0 .. num_text_layers-1` → text encoder, the next `num_unified_layers` → unified encoder, pooler → pooler.

    Raises `ValueError` when the BERT checkpoint has fewer layers than the two encoders need.
    """
    needed = config.num_text_layers + config.num_unified_layers
    if num_bert_layers < needed:
        raise ValueError(
            f"The BERT checkpoint has {num_bert_layers} layers but num_text_layers + num_unified_layers = {needed}"
        )
    mapping = {"embeddings.": f"{prefix}text_embeddings.", "pooler.": f"{prefix}pooler."}
    for layer in range(config.num_text_layers):
        mapping[f"encoder.layer.{layer}."] = f"{prefix}text_encoder.layer.{layer}."
    for layer in range(config.num_unified_layers):
        mapping[f"encoder.layer.{config.num_text_layers + layer}."] = f"{prefix}unified_encoder.layer.{layer}."
    return mapping


def convert_bert_state_dict(
    bert_state_dict: Mapping[str, torch.Tensor], config: CmalConfig, prefix: str = "cmal."
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Renames a BERT state dict (keys with or without the `bert.` prefix) to CMAL names.

    Returns (converted state dict, BERT keys that have no CMAL counterpart, e.g. the MLM head or unmapped layers).
    """
    state = {key.removeprefix("bert."): value for key, value in bert_state_dict.items()}
    layer_ids = {int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")}
    mapping = bert_to_cmal_key_mapping(config, max(layer_ids, default=-1) + 1, prefix)
    converted, skipped = {}, []
    for key, value in state.items():
        source = next((src for src in mapping if key.startswith(src)), None)
        if source is None or key.endswith("position_ids"):
            skipped.append(key)
            continue
        converted[mapping[source] + key[len(source):]] = value
    return converted, skipped


def load_bert_weights(model: CmalPreTrainedModel, bert_path) -> dict[str, list[str]]:
    """Initialises `model`'s text and unified encoders (and embeddings, pooler) from a BERT checkpoint folder or
    `.safetensors` file, in place. Returns `{"loaded": [...], "skipped_bert_keys": [...], "not_initialised": [...]}`.

    Shapes must agree (same `hidden_size`, `intermediate_size`, `vocab_size`); otherwise `ValueError`.
    """
    import os

    from safetensors.torch import load_file

    path = os.fspath(bert_path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"bert_path must be a folder with model.safetensors or a .safetensors file, got {bert_path!r}")
    prefix = "cmal." if hasattr(model, "cmal") else ""
    converted, skipped = convert_bert_state_dict(load_file(path), model.config, prefix)
    own = model.state_dict()
    for key, value in converted.items():
        if key not in own:
            raise ValueError(f"BERT weight maps to {key!r}, which {type(model).__name__} does not have")
        if own[key].shape != value.shape:
            raise ValueError(
                f"BERT weight for {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)} "
                "(hidden_size, intermediate_size and vocab_size must match the checkpoint)"
            )
    model.load_state_dict(converted, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return {
        "loaded": sorted(converted),
        "skipped_bert_keys": sorted(skipped),
        "not_initialised": sorted(set(own) - set(converted)),
    }


__all__ = [
    "CmalForPreTraining",
    "CmalForPreTrainingOutput",
    "CmalModel",
    "CmalModelOutput",
    "CmalPreTrainedModel",
    "bert_to_cmal_key_mapping",
    "convert_bert_state_dict",
    "load_bert_weights",
]
