"""The reference oracle: an independent decoder of what a compressed request should produce.

Test support only. Built with Hugging Face transformers from the same checkpoint the server
loads, it shares none of vLLM's code (processor output aside) and none of the adapter's:

1. prefills the full prompt with its own attention (causal SDPA, GQA by repetition),
   recording every layer's post-RoPE queries; keys and values come from its own cache;
2. plans the compression from those tensors with the project's torch core
   (``meda_vllm.compress.compress`` on dense views, ``pad_to="max"`` per KV cache group
   like the engine: ``kv_layer_groups`` runs of consecutive layers), its modality mask
   from the processor's token ids;
3. keeps, in every layer and KV head, exactly the planned entries (merged K/V for the
   merging policies) and decodes greedily at *logical* positions (M-RoPE: the prompt's
   rope delta plus the logical index), attention over every kept entry.

``run`` returns the greedy tokens, their logprobs, the prompt ids and the plan, so a test
checks the server's kept sets (``MEDA_VLLM_PLAN_DUMP``) and its tokens and logprobs.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meda_vllm import merging
from meda_vllm.compress import compress, required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.types import CompressionPlan, LayerView

ATTN = "meda_oracle"
#: the layer queries of the prefill in flight ({layer index: [H, N, D]}), else None
_QUERIES: dict[int, torch.Tensor] | None = None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention for the prefill, every cached entry visible for one decode query."""
    if not hasattr(module, "layer_idx"):  # the vision tower: transformers' own SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if _QUERIES is not None:
        _QUERIES[module.layer_idx] = query[0].detach().clone()
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len not in (1, k_len):
        raise AssertionError(f"oracle attention: {q_len} queries over {k_len} keys")
    out = F.scaled_dot_product_attention(query, k, v, is_causal=q_len > 1, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, _attention)
    AttentionMaskInterface.register(ATTN, sdpa_mask)  # the mask is ignored by _attention


def _data(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def _image(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(_data(url))).convert("RGB")


def _video(url: str) -> tuple[np.ndarray, float]:
    """Every frame of an mp4 data URL, RGB ``[T, H, W, 3]``, and its frame rate (vLLM's
    OpenCV loader takes all frames of a clip shorter than its frame limit)."""
    import cv2

    fd, path = tempfile.mkstemp(suffix=".mp4")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_data(url))
        cap = cv2.VideoCapture(path)
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        frames = []
        ok, frame = cap.read()
        while ok:
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            ok, frame = cap.read()
        cap.release()
    finally:
        os.remove(path)
    return np.stack(frames), fps


@dataclass
class OracleResult:
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]
    plan: CompressionPlan | None
    vis: torch.Tensor | None
    #: merges whose target was a near-tie (``TIE_MARGIN``), in the order met: the server's
    #: float noise may pick the other target; ``Oracle.run(ties_flipped=...)`` decodes that
    ties: list[str] = field(default_factory=list)


class Oracle:
    """``Oracle(model_dir).run(content, cfg, max_tokens)`` for OpenAI chat ``content`` parts."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        _register_attention()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=ATTN
        ).eval()
        cfg = self.model.config
        self.visual_ids = (cfg.image_token_id, cfg.video_token_id)

    def inputs(self, content: list[dict]):
        from transformers.video_utils import VideoMetadata

        parts, images, videos, metadata = [], [], [], []
        for part in content:
            if part["type"] == "image_url":
                parts.append({"type": "image"})
                images.append(_image(part["image_url"]["url"]))
            elif part["type"] == "video_url":
                parts.append({"type": "video"})
                frames, fps = _video(part["video_url"]["url"])
                videos.append(frames)
                t, h, w, _ = frames.shape
                metadata.append(
                    VideoMetadata(total_num_frames=t, fps=fps, duration=t / fps, width=w, height=h)
                )
            else:
                parts.append({"type": "text", "text": part["text"]})
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
        )
        kwargs = {}
        if images:
            kwargs["images"] = images
        if videos:
            # vLLM samples video frames the way the HF processor does at 2 frames per second
            kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=True, fps=2.0)
        return self.processor(text=[text], return_tensors="pt", **kwargs)

    @torch.no_grad()
    def run(
        self,
        content: list[dict],
        cfg: KVPolicyConfig | None,
        max_tokens: int,
        ties_flipped: frozenset[int] = frozenset(),
    ) -> OracleResult:
        """Greedy decode of ``content``; compressed with ``cfg`` after the prefill (None or a
        policy that evicts nothing: the full cache). ``ties_flipped``: indices into the
        result's ``ties`` whose evicted entry merges into its second most similar kept key."""
        global _QUERIES
        from transformers import DynamicCache

        inputs = self.inputs(content)
        ids = inputs["input_ids"]
        n = ids.shape[1]
        visual = torch.isin(ids[0], torch.tensor(self.visual_ids))
        vis = visual if bool(visual.any()) else None
        if vis is not None:
            positions, delta = self.model.model.get_rope_index(
                ids,
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs.get("video_grid_thw"),
            )
            delta = int(delta.reshape(-1)[0])
        else:
            positions, delta = torch.arange(n).view(1, 1, n).expand(3, 1, n), 0
        cache = DynamicCache(config=self.model.config)
        _QUERIES = {}
        try:
            out = self.model(
                **inputs, position_ids=positions, past_key_values=cache, use_cache=True
            )
            queries = _QUERIES
        finally:
            _QUERIES = None
        plan, ties = None, []
        if cfg is not None:
            with _tie_aware_matching(ties, ties_flipped):
                plan = self._compress(cache, queries, vis, n, cfg)
        tokens, logprobs = [], []
        logits = out.logits[0, -1].float()
        for step in range(max_tokens):
            lp = torch.log_softmax(logits, dim=-1)
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            if step == max_tokens - 1:
                break
            pos = torch.full((3, 1, 1), n + step + delta, dtype=torch.long)
            out = self.model(
                input_ids=torch.tensor([[tok]]),
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[0, -1].float()
        return OracleResult(ids[0].tolist(), tokens, logprobs, plan, vis, ties)

    @staticmethod
    def _compress(cache, queries, vis, n: int, cfg: KVPolicyConfig) -> CompressionPlan | None:
        """Plan from the oracle's own prefill tensors; keep exactly that in ``cache``."""
        layers = cache.layers
        qpos = required_query_positions(cfg, n, vis)

        def view(layer: int) -> LayerView:
            keys, values = layers[layer].keys[0], layers[layer].values[0]
            return LayerView(
                keys=keys, values=values, queries=queries[layer][:, qpos], query_pos=qpos, vis=vis
            )

        # one physical length per KV cache group (kv_layer_groups runs of consecutive layers)
        groups = [layer * cfg.kv_layer_groups // len(layers) for layer in range(len(layers))]
        plan = compress(view, len(layers), cfg, n, pad_to="max", groups=groups)
        if plan is None:
            return None
        for layer, lp in zip(layers, plan.layers, strict=True):
            keys, values = layer.keys[0], layer.values[0]
            idx = lp.kept[..., None].expand(-1, -1, keys.shape[-1])
            kept_k = lp.keys if lp.keys is not None else keys.gather(1, idx)
            kept_v = lp.values if lp.values is not None else values.gather(1, idx)
            layer.keys = kept_k.to(keys.dtype)[None].contiguous()
            layer.values = kept_v.to(values.dtype)[None].contiguous()
        return plan


#: cosine-similarity margin below which a merge target counts as a tie: the server's keys
#: differ from the oracle's by float rounding (~1e-6), enough to pick the other target.
#: Repeated tokens tie exactly by symmetry (the same token at RoPE distances d and -d of an
#: evicted copy), so prompts with chat templates meet ties often.
TIE_MARGIN = 1e-5


@contextlib.contextmanager
def _tie_aware_matching(ties: list[str], flipped: frozenset[int]):
    """While planning: record every near-tie merge target (appended to ``ties``, in call
    order) and send the ties named in ``flipped`` to their second most similar kept key."""
    real = merging.nearest_kept
    layer = iter(range(1 << 30))  # called once per merged layer, in layer order

    def nearest_kept(keys, kept, evicted):
        target = real(keys, kept, evicted)
        index = next(layer)
        for head in range(keys.shape[0]):
            if evicted.shape[1] == 0 or kept.shape[1] < 2:
                continue
            k_kept = F.normalize(keys[head, kept[head]].float(), dim=-1)
            k_ev = F.normalize(keys[head, evicted[head]].float(), dim=-1)
            top = (k_ev @ k_kept.t()).topk(2, dim=-1)
            for i in (top.values[:, 0] - top.values[:, 1] < TIE_MARGIN).nonzero().flatten():
                if len(ties) in flipped:  # the other of the two (topk orders a tie freely)
                    first, second = top.indices[i, 0], top.indices[i, 1]
                    target[head, i] = second if target[head, i] == first else first
                ties.append(f"merged layer {index} head {head} evicted {int(evicted[head, i])}")
        return target

    merging.nearest_kept = nearest_kept
    try:
        yield
    finally:
        merging.nearest_kept = real
