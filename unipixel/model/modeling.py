"""UniPixel: Qwen2.5-VL + SAM 2.1 joined by the `<|ref|>`, `<|mem|>` and `<|seg|>` token paths."""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm
from transformers.utils import ModelOutput

from ..errors import PromptError
from .configuration import PixelQwen2_5_VLConfig
from .sam2_video import SAM2Video, build_sam2, prepare_sam2_video
from .visual_prompts import RefPrompt, TemporalPositionEncoding, mem_slot_cells


@dataclass
class VideoFeatures:
    """One media's vision-tower output, kept so that later turns do not re-encode it."""

    embeds: torch.Tensor  # [N, d] merged tokens, raster order (what the LLM sees)
    merger_inputs: torch.Tensor  # [N, v] merger MLP input, window order (spec §4 `<|mem|>`)
    grid_thw: torch.Tensor  # [1, 3]

    def to(self, device) -> VideoFeatures:
        return VideoFeatures(self.embeds.to(device), self.merger_inputs.to(device), self.grid_thw.to(device))


@dataclass
class PixelCausalLMOutput(CausalLMOutputWithPast):
    """Causal LM output plus the masks of the `<|seg|>` tokens found in the input."""

    seg_hidden: torch.Tensor | None = None  # [n, d] pre-norm hidden states before each `<|seg|>`
    masks: torch.Tensor | None = None  # [n, T, H, W] bool


@dataclass
class PixelGenerateOutput(ModelOutput):
    sequences: torch.Tensor | None = None
    masks: torch.Tensor | None = None  # [n, T, H, W] bool: input `<|seg|>` first, then generated
    seg_hidden: torch.Tensor | None = None  # [n, d] the states those masks are decoded from


def _signed(fn):
    """`fn` carrying its signature: `generate` asks for the model's about ten times a call, and
    inspect would rebuild it each time (a cost in every turn's time to first token)."""
    fn.__signature__ = inspect.signature(fn)
    return fn


def _runs(values: torch.Tensor) -> list[tuple[int, int]]:
    """(value, length) of each run of equal values of a 1-D tensor, as `itertools.groupby` gives
    them, found by the tensor ops (a chat is thousands of tokens in a handful of runs)."""
    if not len(values):
        return []
    starts = [0, *((values[1:] != values[:-1]).nonzero()[:, 0] + 1).tolist()]
    kinds = values[starts].tolist()
    return [(kind, end - start) for kind, start, end in zip(kinds, starts, [*starts[1:], len(values)])]


class PixelQwen2_5_VLModel(Qwen2_5_VLModel):
    """Qwen2.5-VL with the reference's 3-D positions (UniPixel spec §3)."""

    def mm_token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 text, 1 image, 2 video, read from the placeholder tokens as the reference did."""
        image = (input_ids == self.config.image_token_id).long()
        return image + 2 * (input_ids == self.config.video_token_id).long()

    def get_rope_index(
        self,
        input_ids,
        mm_token_type_ids=None,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        attention_mask=None,
        **kwargs,
    ):
        """transformers 4.53's rule: text after a media starts at the largest id any axis of that
        media used, plus one (5.x advances by the spatial side only, which the weights never saw)."""
        if mm_token_type_ids is None:
            mm_token_type_ids = self.mm_token_types(input_ids)
        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = self.config.vision_config.tokens_per_second
        grids = {1: iter(image_grid_thw if image_grid_thw is not None else []), 2: iter(video_grid_thw)}
        seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
        position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
        deltas = []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(input_ids[b], dtype=torch.bool)
            pieces, start = [], 0
            for kind, length in _runs(mm_token_type_ids[b][keep]):
                if kind == 0:
                    ids = torch.arange(length, device=input_ids.device).expand(3, -1) + start
                else:
                    interval = tokens_per_second * next(seconds, 1.0) if kind == 2 else 1
                    ids = self.get_vision_position_ids(start, next(grids[kind]), 1, merge, interval, input_ids.device)
                pieces.append(ids)
                start = int(ids.max()) + 1
            position_ids[:, b, keep] = torch.cat(pieces, dim=1).to(position_ids)
            deltas.append(start - int(keep.sum()))
        return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


class PixelQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = PixelQwen2_5_VLConfig
    _prompt_kwargs = ("ref_prompts", "mem_masks", "mem_cells", "video_features")
    # SAM 2 keeps float32 weights and runs under autocast, as its own predictor does: several of its
    # ops (layer norms, positional encodings) take float32 inputs whatever the weights are.
    _keep_in_fp32_modules_strict = ["sam2"]

    def __init__(self, config: PixelQwen2_5_VLConfig):
        super().__init__(config)
        # Same modules, only the position rule differs: re-class rather than build the LLM twice.
        self.model.__class__ = PixelQwen2_5_VLModel
        d = config.text_config.hidden_size
        v = config.vision_config.hidden_size * config.vision_config.spatial_merge_size**2
        size = config.sam2_image_size
        # Hiera's init calls .item(), so SAM 2 is always built on a real device (even under meta).
        with torch.device("cpu"):
            self.sam2 = build_sam2(config.sam2_config, size)
        s = self.sam2.hidden_dim
        self.seg_head = nn.Sequential(
            Qwen2_5_VLRMSNorm(d, eps=1e-6), nn.Linear(d, d), nn.GELU(), nn.Linear(d, s * config.sam2_hidden_tokens)
        )
        self.ref_encoder = PromptEncoder(
            embed_dim=s, image_embedding_size=(size // 16, size // 16), input_image_size=(size, size), mask_in_chans=16
        )
        self.ref_proj_single = nn.Linear(2 * s, 3 * s)
        self.ref_proj_double = nn.Linear(3 * s, 3 * s)
        self.ref_proj = nn.Sequential(nn.GELU(), nn.Linear(6 * s, d))
        self.tem_pe = TemporalPositionEncoding(s)
        self.tem_emb = nn.Embedding(1, s)
        self.tem_proj = nn.Linear(s, 3 * s)
        self.msk_proj = nn.Sequential(nn.Linear(v, v), nn.GELU(), nn.Linear(v, d))
        self.post_init()

    def save_pretrained(self, *args, **kwargs):
        """Always in the published layout (spec §2 "On disk"): transformers would otherwise re-save a
        checkpoint read in the in-memory names in those names, which the authors' code cannot load."""
        self.__dict__.pop("_weight_conversions", None)
        return super().save_pretrained(*args, **kwargs)

    # ---- vision features -------------------------------------------------------------------
    def encode_video(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> VideoFeatures:
        """Run the vision tower once, keeping the window-ordered merger input for `<|mem|>`."""
        pixel_values_videos, video_grid_thw = pixel_values_videos.to(self.device), video_grid_thw.to(self.device)
        captured = []
        hook = self.model.visual.merger.mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            out = self.model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        finally:
            hook.remove()
        return VideoFeatures(torch.cat(out.pooler_output), captured[0], video_grid_thw)

    def prepare_sam2_video(self, frames, cache: bool = True) -> SAM2Video:
        return prepare_sam2_video(frames, self.config.sam2_image_size, self.sam2.device, cache=cache)

    # ---- the three token paths ---------------------------------------------------------------
    def encode_ref_prompts(self, prompts: list[RefPrompt], grid_t: int) -> torch.Tensor:
        """Point/box prompts -> [K, d] embeddings for the `<|ref|>` tokens (spec §4)."""
        out = []
        num_slots = 2 * grid_t
        for p in prompts:
            if not 0 <= p.frame < num_slots:
                raise PromptError(f"prompt frame {p.frame} is outside the {num_slots} (padded) frames")
            coords = p.coords.to(self.device, torch.float32)[None]
            x = torch.tensor([2 * p.frame / (num_slots - 1) - 1], device=self.device, dtype=torch.float32)
            # Both positional encodings take float32 positions whatever dtype the weights are in.
            with self._autocast(self.dtype != torch.float32):
                sparse, _ = self.ref_encoder(points=(coords, p.labels.to(self.device)[None]), boxes=None, masks=None)
                pe = self.tem_pe(x)
            proj = {2: self.ref_proj_single, 3: self.ref_proj_double}.get(sparse.shape[1])
            if proj is None:
                raise PromptError("a <|ref|> prompt is one point or one box")
            ref = proj(sparse.flatten(1).to(self.dtype))
            time = self.tem_proj((pe.float() + self.tem_emb.weight[0].float()).to(self.dtype))
            out.append(self.ref_proj(torch.cat([ref, time], dim=-1)))
        return torch.cat(out)

    def encode_mem_masks(self, masks: list[torch.Tensor], features: VideoFeatures) -> torch.Tensor:
        """Object masks [T, H, W] -> [K, d] embeddings for the `<|mem|>` tokens (spec §4)."""
        grid = features.grid_thw[0]
        return self.encode_mem_cells([mem_slot_cells(m.to(self.device), grid) for m in masks], features)

    def encode_mem_cells(self, cells_per_object: list[torch.Tensor], features: VideoFeatures) -> torch.Tensor:
        """`mem_slot_cells` of each object -> [K, d] `<|mem|>` embeddings, one per present slot.

        The reference indexes the window-ordered merger inputs with raster-order cell masks; the
        weights were trained that way, so we do the same.
        """
        grid_t, grid_h, grid_w = (int(v) for v in features.grid_thw[0])
        means = []
        for cells in cells_per_object:
            if tuple(cells.shape) != (grid_t, grid_h // 2, grid_w // 2):
                raise PromptError(f"<|mem|> cells {tuple(cells.shape)} do not match the media's "
                                  f"{(grid_t, grid_h // 2, grid_w // 2)} merged-token grid")  # fmt: skip
            cells = cells.to(self.device).flatten(1)
            per_slot = cells.shape[1]
            for t in cells.any(dim=1).nonzero()[:, 0].tolist():  # the present slots, one host sync
                rows = features.merger_inputs[t * per_slot : (t + 1) * per_slot]
                means.append(rows[cells[t]].mean(dim=0))
        # One projection of every slot's mean: a call per slot cost more than the projection itself.
        return self.msk_proj(torch.stack(means))

    def decode_seg_masks(self, seg_hidden: torch.Tensor, video: SAM2Video, clicks=None, progress=None) -> torch.Tensor:
        """`<|seg|>` hidden states [n, d] -> masks [n, T, H, W] bool, sharing one propagation.

        `clicks`: optional SAM 2 point refinements per object (see `PixelSAM2VideoPredictor.segment`).
        """
        with self.sam2_autocast():
            return self.sam2.segment(video, self.seg_tokens(seg_hidden), clicks=clicks, progress=progress)

    def seg_tokens(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """`<|seg|>` hidden states [n, d] -> SAM 2 prompt tokens [n, k, s] (spec §4)."""
        tokens = self.seg_head(seg_hidden.to(self.dtype))
        return tokens.view(seg_hidden.shape[0], self.config.sam2_hidden_tokens, -1)

    def sam2_autocast(self):
        """SAM 2 stores its memory in bfloat16, which float16 autocast cannot mix in: under float16
        weights, SAM 2 (float32 weights) runs in float32."""
        return self._autocast(self.dtype == torch.bfloat16)

    def retrack(self, video: SAM2Video, masks: torch.Tensor, frame: int, coords: torch.Tensor, labels: torch.Tensor,
                **kwargs) -> torch.Tensor:
        """One object's track [T, H, W] re-run from SAM 2 clicks on `frame` (`PixelSAM2VideoPredictor.retrack`)."""
        with self.sam2_autocast():
            return self.sam2.retrack(video, masks, frame, coords, labels, **kwargs)

    def _on_device(self, x, device=None):
        """The processor makes its tensors on the host; the model may be on a GPU. `device`: the
        model's, looked up once by a caller moving many values (each lookup walks the parameters)."""
        return x.to(device or self.device) if isinstance(x, torch.Tensor) else x

    def _autocast(self, enabled: bool):
        """SAM 2 code mixes float32 inputs with the weights: autocast them to the weights' half dtype."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _special_positions(self, input_ids: torch.Tensor, token_id: int | None, count: int, what: str):
        pos = (input_ids[0] == token_id).nonzero()[:, 0] if token_id is not None else input_ids.new_zeros(0)
        if len(pos) != count:
            raise PromptError(f"the text has {len(pos)} {what} token(s) but {count} {what} input(s) were given")
        return pos

    def build_inputs_embeds(self, input_ids, features: VideoFeatures | None, ref_prompts, mem_masks, mem_cells=None):
        """Token embeddings with the `<|ref|>` and `<|mem|>` tokens replaced (batch of one).

        `<|mem|>` objects come as masks [T, H, W] or, already reduced, as `mem_slot_cells` (what a
        session computed anyway to write the prompt): one or the other, never both."""
        embeds = self.get_input_embeddings()(input_ids)
        cfg = self.config
        if ref_prompts is not None or (input_ids == cfg.ref_token_id).any():
            prompts = ref_prompts or []
            pos = self._special_positions(input_ids, cfg.ref_token_id, len(prompts), "<|ref|>")
            if prompts:
                embeds[0, pos] = self.encode_ref_prompts(prompts, int(features.grid_thw[0, 0])).to(embeds.dtype)
        if mem_masks is not None or mem_cells is not None or (input_ids == cfg.mem_token_id).any():
            if features is None:
                raise PromptError("<|mem|> tokens need the video features of the media")
            if mem_masks and mem_cells:
                raise PromptError("give the <|mem|> objects as masks or as cells, not both")
            if mem_cells:
                mem = self.encode_mem_cells(mem_cells, features)
            elif mem_masks:
                mem = self.encode_mem_masks(mem_masks, features)
            else:
                mem = embeds.new_zeros(0, embeds.shape[-1])
            pos = self._special_positions(input_ids, cfg.mem_token_id, len(mem), "<|mem|>")
            embeds[0, pos] = mem.to(embeds.dtype)
        return embeds

    @contextlib.contextmanager
    def _record_prenorm(self):
        """Collect the hidden states entering the text model's final norm, one entry per forward."""
        states: list[torch.Tensor] = []
        hook = self.model.language_model.norm.register_forward_pre_hook(lambda m, args: states.append(args[0]))
        try:
            yield states
        finally:
            hook.remove()

    # ---- transformers entry points -----------------------------------------------------------
    @_signed
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        mm_token_type_ids=None,
        video_features: VideoFeatures | None = None,
        ref_prompts: list[RefPrompt] | None = None,
        mem_masks: list[torch.Tensor] | None = None,
        mem_cells: list[torch.Tensor] | None = None,
        sam2_video: SAM2Video | None = None,
        mm_encoder_outputs=None,
        **kwargs,
    ) -> PixelCausalLMOutput:
        """Qwen2.5-VL forward plus the pixel paths (batch of one for `<|ref|>`/`<|mem|>`/`<|seg|>`).

        `video_features` (from `encode_video`) replaces `pixel_values_videos` to reuse an encoding.
        `mem_cells` (`mem_slot_cells` of each object) replaces `mem_masks` where they are computed.
        With `sam2_video`, every input position followed by `<|seg|>` is decoded into a mask.
        """
        device = self.device
        input_ids, attention_mask, position_ids, video_grid_thw, second_per_grid_ts, mm_token_type_ids = (
            self._on_device(x, device)
            for x in (input_ids, attention_mask, position_ids, video_grid_thw, second_per_grid_ts, mm_token_type_ids)
        )
        if pixel_values_videos is not None and video_features is None:
            video_features = self.encode_video(pixel_values_videos, video_grid_thw)
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = self.model.mm_token_types(input_ids)  # spec §3: without them, 1-D positions
        if video_features is not None:
            video_grid_thw = video_features.grid_thw
            # `generate` hands over an empty dict once it has encoded; a prefill after cached keys and
            # values (a later turn) holds no video token, so there is nothing to scatter.
            if input_ids is None or (input_ids == self.config.video_token_id).any():
                mm_encoder_outputs = {"video": BaseModelOutputWithPooling(pooler_output=(video_features.embeds,))}
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.build_inputs_embeds(input_ids, video_features, ref_prompts, mem_masks, mem_cells)
        with self._record_prenorm() as states:
            out = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts,
                mm_token_type_ids=mm_token_type_ids,
                mm_encoder_outputs=mm_encoder_outputs,
                **kwargs,
            )
        seg_hidden = masks = None
        if input_ids is not None and (input_ids[0, 1:] == self.config.seg_token_id).any():
            seg_hidden = states[0][0, :-1][input_ids[0, 1:] == self.config.seg_token_id]
            if sam2_video is not None:
                masks = self.decode_seg_masks(seg_hidden, sam2_video)
        return PixelCausalLMOutput(**out, seg_hidden=seg_hidden, masks=masks)

    @_signed
    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration:
            for key in self._prompt_kwargs:
                inputs.pop(key, None)
        return inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        sam2_video: SAM2Video | None = None,
        decode_input_segs: bool = True,
        progress=None,
        on_seg: Callable[[torch.Tensor], None] | None = None,
        **kwargs,
    ):
        """Greedy-by-default `generate` that also decodes every `<|seg|>` into a mask.

        Returns a `PixelGenerateOutput`: `sequences`, `seg_hidden` [n, d] the states of the `<|seg|>`
        tokens of the input (teacher-forced; skipped with `decode_input_segs=False`, e.g. for a
        conversation history already decoded) then of the answer, in order of appearance, and with
        `sam2_video` their `masks` [n, T, H, W].
        `on_seg` receives the hidden state [1, d] of each generated `<|seg|>` as soon as it is
        generated, before the next token (e.g. to segment its object while the answer goes on).
        """
        kwargs.setdefault("do_sample", False)
        kwargs["return_dict_in_generate"] = True
        device = self.device
        input_ids = self._on_device(input_ids, device)
        kwargs = {k: self._on_device(v, device) for k, v in kwargs.items()}
        if kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = self.model.mm_token_types(input_ids)
        grid = kwargs.get("video_grid_thw")
        if kwargs.get("position_ids") is None and grid is not None:
            # Positions of the whole sequence, from it alone: a prefix in `past_key_values` and other
            # conversations' calls (the model's shared `rope_deltas`) cannot shift them.
            mask = kwargs.get("attention_mask")
            rope, _ = self.model.get_rope_index(input_ids, kwargs["mm_token_type_ids"], video_grid_thw=grid,
                                                second_per_grid_ts=kwargs.get("second_per_grid_ts"), attention_mask=mask)  # fmt: skip
            text = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(input_ids.shape[1])[None]
            kwargs["position_ids"] = torch.cat([text[None].to(rope), rope])
        if kwargs.get("pixel_values_videos") is not None and kwargs.get("video_features") is None:
            # Encode here, not in `generate`, so the `<|mem|>` path gets the merger inputs too.
            kwargs["video_features"] = self.encode_video(kwargs.pop("pixel_values_videos"), kwargs["video_grid_thw"])
        seg = self.config.seg_token_id
        with self._record_prenorm() as states:
            if on_seg is not None:
                watcher = _SegWatcher(seg, states, on_seg)
                kwargs["stopping_criteria"] = StoppingCriteriaList([watcher, *(kwargs.get("stopping_criteria") or [])])
            out = super().generate(input_ids=input_ids, **kwargs)
        hidden = [states[0][0, :-1][input_ids[0, 1:] == seg]] if decode_input_segs else []
        # Forward call j produced generated token j, so its last position is the state before it.
        new_tokens = out.sequences[0, input_ids.shape[1] :]
        hidden += [states[j][0, -1:] for j in (new_tokens == seg).nonzero()[:, 0].tolist()]
        masks = None
        hidden = torch.cat(hidden) if sum(len(h) for h in hidden) else None
        if sam2_video is not None and hidden is not None:
            masks = self.decode_seg_masks(hidden, sam2_video, progress=progress)
        return PixelGenerateOutput(sequences=out.sequences, masks=masks, seg_hidden=hidden)


class _SegWatcher(StoppingCriteria):
    """Hands each generated `<|seg|>`'s hidden state to `on_seg` as it is generated; never stops."""

    def __init__(self, seg_token_id: int, states: list[torch.Tensor], on_seg: Callable[[torch.Tensor], None]):
        self.seg, self.states, self.on_seg = seg_token_id, states, on_seg

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if int(input_ids[0, -1]) == self.seg:
            self.on_seg(self.states[-1][0, -1:])  # the forward that produced the token: its last position
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
