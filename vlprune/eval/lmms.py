"""lmms-eval model ``vlprune``: a Hugging Face VLM, optionally pruned by a vlprune method.

Registered through the Python entry-point group ``lmms_eval.models`` (see ``pyproject.toml``;
lmms-eval 0.7 loads the group in ``lmms_eval/models/__init__.py``), so after installing vlprune::

    lmms-eval --model vlprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=hiprune,budget=64 \\
        --tasks mme --batch_size 4 --log_samples --output_path logs/

Model arguments (``--model_args k=v,...``):

- ``pretrained``: local directory or hub id of a LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
  Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE or Qwen3.5 checkpoint; the family comes from its
  ``config.json`` (``model_type``).
- ``method``: a registered vlprune method, or ``none`` for the unpruned baseline. Both run the same
  code below (prompting, batching, generation); ``none`` just installs no hooks.
- ``budget`` / ``ratio``: as in :func:`vlprune.patch` (ignored with ``method=none``).
- ``stats_path``: directory for per-sample pruning stats (``samples_rank<r>.jsonl``) and their
  summary (``summary.json``); ``vlprune eval`` fills it from ``--output_path``.
- ``dtype`` (``auto``), ``attn_implementation`` (``sdpa``), ``device``, ``revision``,
  ``chat_template`` (a Jinja string or file replacing the checkpoint's template).
- any other key is a method option, e.g. ``layer=3`` for ``fastv``.

Prompts: the checkpoint's processor chat template when it has one (``chat_template.jinja`` /
``.json``), one user turn holding the request's images and text. Without a template (e.g. the tiny
test checkpoints) the prompt is plain: one image placeholder per image, a newline, the task text.
A ``<image>`` inside the task text marks where an image goes (lmms-eval's convention); images
without a mark go first.

Multi-GPU data parallel: ``accelerate launch --num_processes N -m lmms_eval --model vlprune ...``;
each process loads the model on its own device and lmms-eval shards the requests by rank.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)

import vlprune
from vlprune.api import PruneStats

MODEL_CLASSES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}
"""``config.model_type`` → model class, for the families vlprune supports."""

IMAGE_MARK = "<image>"
"""Where a task's prompt text places an image (lmms-eval convention)."""

_QWEN_IMAGE = "<|vision_start|>{}<|vision_end|>"
_PLAIN_IMAGE = {
    "llava": "{}",
    "llava_next": "{}",
    "qwen2_vl": _QWEN_IMAGE,
    "qwen2_5_vl": _QWEN_IMAGE,
    "qwen3_vl": _QWEN_IMAGE,
    "qwen3_vl_moe": _QWEN_IMAGE,
    "llava_onevision": "{}",
    "qwen3_5": _QWEN_IMAGE,
}
"""Plain-prompt image placeholder per family; ``{}`` is the processor's ``image_token``."""

NESTED_IMAGES = ("llava_onevision",)
"""Families whose processor takes each prompt's images as one list (LLaVA-OneVision encodes an
image of a multi-image prompt as a thumbnail only, ``batch_num_images``)."""


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: model id ``vlprune`` → :class:`VLPrune`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlprune", simple_class_path="vlprune.eval.lmms.VLPrune")


# --------------------------------------------------------------------------------------------
# Loading


class _ImagesOnly:
    """Processor mixin without the video processor.

    Qwen2-VL/2.5-VL/3-VL/3.5 and LLaVA-OneVision processors load a torchvision video processor,
    which fails where torchvision is not installed; image tasks never use it. Dropping
    ``video_processor`` from the processor's attributes lets ``from_pretrained`` and
    ``save_pretrained`` work without it
    (``vlprune.testing``'s no-video processors only skip the constructor's class check).
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [a for a in super().get_attributes() if a != "video_processor"]  # type: ignore[misc]

    def check_argument_for_proper_class(self, argument_name: str, argument: object) -> object:
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


class Qwen2VLProcessorImagesOnly(_ImagesOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images (loads and saves without torchvision)."""


class Qwen2_5_VLProcessorImagesOnly(_ImagesOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images (loads and saves without torchvision)."""


class Qwen3VLProcessorImagesOnly(_ImagesOnly, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images (loads and saves without torchvision)."""


class LlavaOnevisionProcessorImagesOnly(_ImagesOnly, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` for images (loads and saves without torchvision)."""


IMAGES_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLProcessorImagesOnly,
    "qwen2_5_vl": Qwen2_5_VLProcessorImagesOnly,
    "qwen3_vl": Qwen3VLProcessorImagesOnly,
    "qwen3_vl_moe": Qwen3VLProcessorImagesOnly,
    "llava_onevision": LlavaOnevisionProcessorImagesOnly,
    "qwen3_5": Qwen3VLProcessorImagesOnly,
}


def load_processor(pretrained: str, family: str, **kwargs: Any) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained``; for Qwen without torchvision, an images-only processor.

    The tokenizer pads on the left (batched generation).
    """
    try:
        processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    except ImportError as err:
        if family not in IMAGES_ONLY_PROCESSORS:
            raise
        reason = str(err).strip().splitlines()[0]
        logger.info(f"vlprune: loading the processor without its video part ({reason})")
        processor = IMAGES_ONLY_PROCESSORS[family].from_pretrained(pretrained, **kwargs)
    processor.tokenizer.padding_side = "left"
    return processor


def model_family(pretrained: str, **kwargs: Any) -> str:
    """The checkpoint's family (``config.model_type``); ``ValueError`` if vlprune lacks it."""
    model_type = AutoConfig.from_pretrained(pretrained, **kwargs).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{pretrained!r} is a {model_type!r} model; the vlprune lmms-eval model supports "
            f"{', '.join(MODEL_CLASSES)}"
        )
    return model_type


# --------------------------------------------------------------------------------------------
# Prompts


def prompt_segments(context: str, n_images: int) -> list[str | None]:
    """The request as text segments and images (``None``), in prompt order.

    The first ``n_images`` ``<image>`` marks in ``context`` become images, images without a mark
    come first, surplus marks are dropped, empty text segments are left out.
    """
    parts = context.split(IMAGE_MARK)
    inline = min(len(parts) - 1, n_images)
    parts = [*parts[:inline], "".join(parts[inline:])]
    segments: list[str | None] = [None] * (n_images - inline)
    for i, part in enumerate(parts):
        if i:
            segments.append(None)
        if part:
            segments.append(part)
    return segments


def build_prompt(processor: ProcessorMixin, family: str, context: str, n_images: int) -> str:
    """The prompt of one request: the processor's chat template if it has one, else plain.

    Template: one user turn whose content lists the images and text segments in order, plus the
    generation prompt. Plain (no template): each image's placeholder (``<image>`` for LLaVA,
    ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen) in place, leading images each
    followed by a newline, text as given; no role markers.
    """
    segments = prompt_segments(context, n_images)
    if getattr(processor, "chat_template", None):
        content = [
            {"type": "image"} if seg is None else {"type": "text", "text": seg.strip()}
            for seg in segments
            if seg is None or seg.strip()
        ]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    placeholder = _PLAIN_IMAGE[family].format(processor.image_token)
    leading = next((i for i, seg in enumerate(segments) if seg is not None), len(segments))
    return "".join(
        seg if seg is not None else placeholder + ("\n" if i < leading else "")
        for i, seg in enumerate(segments)
    )


def truncate_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


# --------------------------------------------------------------------------------------------
# Per-sample stats


@dataclass
class SampleStats:
    """Token counts of one request's prefill, without padding.

    ``prompt_tokens``: prompt length (image placeholders included); ``visual_tokens``: image
    placeholders; ``kept_tokens``: visual tokens left after the last cut; ``llm_tokens``: tokens
    into the first decoder layer; ``layer_tokens``: tokens entering each decoder layer.
    """

    images: int
    prompt_tokens: int
    visual_tokens: int
    kept_tokens: int
    llm_tokens: int
    layer_tokens: list[int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_stats(
    config: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images: Sequence[int],
    stats: PruneStats | None,
) -> list[SampleStats]:
    """Per-sample counts of a left-padded batch from its inputs and the handle's ``stats``.

    ``stats`` (``None`` = unpatched) reports padded widths: a row's padding is the batch width
    after the vision cut (``kept_seq_len``) minus its own tokens, and stays the same in every
    layer (decoder cuts drop visual rows only), so it is subtracted from ``layer_tokens``.
    """
    prompt = attention_mask.sum(1).tolist()
    visual = (input_ids == config.image_token_id).sum(1).tolist()
    n_layers = config.get_text_config().num_hidden_layers
    if stats is None or not stats.visual_tokens:
        return [SampleStats(n, p, v, v, p, [p] * n_layers)
                for n, p, v in zip(images, prompt, visual)]
    into_llm = list(visual)
    if stats.kept_per_image:
        per_image = iter(stats.kept_per_image)
        into_llm = [sum(next(per_image) for _ in range(n)) for n in images]
    rows = []
    for b, (n, p, v) in enumerate(zip(images, prompt, visual)):
        llm = p - v + into_llm[b]
        pad = stats.kept_seq_len - llm
        layers = [t - pad for t in stats.layer_tokens[b]]
        rows.append(SampleStats(n, p, v, stats.kept_tokens[b], llm, layers))
    return rows


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over samples: visual, kept, LLM-input and per-layer tokens (and FLOPs if logged)."""
    summary: dict[str, Any] = {"samples": len(records)}
    for key in ("visual_tokens", "kept_tokens", "llm_tokens", "llm_prefill_flops"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[f"mean_{key}"] = statistics.fmean(values)
    summary["mean_layer_tokens"] = statistics.fmean(
        statistics.fmean(r["layer_tokens"]) for r in records
    )
    return summary


# --------------------------------------------------------------------------------------------
# The model


def _batches(keys: Sequence[tuple[str, int]], size: int) -> list[list[int]]:
    """Request indices in chunks of ``size``: grouped by ``key[0]`` (task and generation
    settings), longest ``key[1]`` (prompt characters) first, then in request order."""
    order = sorted(range(len(keys)), key=lambda i: (keys[i][0], -keys[i][1], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < size and keys[batches[-1][0]][0] == keys[i][0]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class VLPrune(lmms):
    """lmms-eval "simple" model: generation and loglikelihood requests, batched, data-parallel.

    Arguments as in the module docstring. ``batch_size`` is per process (an int; lmms-eval's
    ``auto`` is not supported, so its ``max_batch_size`` is accepted and unused). One
    :func:`vlprune.patch` is installed after loading (none for ``method=none``); each batch's
    ``handle.stats`` become per-sample records (:class:`SampleStats` plus task, doc id,
    settings, generated tokens and, where ``vlprune.eval.profiler`` exists, the decoder
    layers' analytic prefill FLOPs ``llm_prefill_flops``).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        budget: int | None = None,
        ratio: float | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        revision: str | None = None,
        chat_template: str | None = None,
        stats_path: str | None = None,
        max_batch_size: int | None = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be an int ≥ 1 (no 'auto'), got {batch_size!r}")
        self.batch_size_per_gpu = int(batch_size)
        self._setup_device(device)
        hub = {"revision": revision} if revision else {}
        self.family = model_family(pretrained, **hub)
        self.processor = load_processor(pretrained, self.family, **hub)
        if chat_template:
            path = Path(chat_template)
            self.processor.chat_template = path.read_text() if path.is_file() else chat_template
        self.tokenizer = self.processor.tokenizer
        self._model = self._load_model(pretrained, dtype, attn_implementation, hub)
        self.handle = None
        self.settings: dict[str, Any] = {"method": "none"}
        if method != "none":
            self.handle = vlprune.patch(self._model, method, budget=budget, ratio=ratio,
                                        **method_options)
            self.settings = {"method": method, "budget": budget, "ratio": ratio, **method_options}
        elif method_options:
            raise ValueError(f"method=none takes no method options, got {sorted(method_options)}")
        self.stats_path = Path(stats_path) if stats_path else None
        self.records: list[dict[str, Any]] = []
        self._all_records: list[dict[str, Any]] = []
        self._flops = _llm_flops_fn(self._model, self.family)
        logger.info(f"vlprune: {self.family} {pretrained} on {self._device}, {self.settings}")

    # ---- setup ---------------------------------------------------------------------------

    def _setup_device(self, device: str | None) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        else:
            default = "cuda" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(device or default)

    def _load_model(self, pretrained: str, dtype: str, attn: str, hub: dict) -> torch.nn.Module:
        import transformers

        cls = getattr(transformers, MODEL_CLASSES[self.family])
        torch_dtype = dtype if dtype == "auto" else getattr(torch, str(dtype))
        model = cls.from_pretrained(pretrained, dtype=torch_dtype, attn_implementation=attn, **hub)
        return model.to(self._device).eval()

    @property
    def model(self) -> torch.nn.Module:
        """The (patched) Hugging Face model."""
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- requests ------------------------------------------------------------------------

    def _visuals(self, req: Instance, doc_to_visual: Callable | None) -> list[Image.Image]:
        task, split, doc_id = req.args[-2], req.args[-1], req.args[-3]
        if doc_to_visual is None:
            return []
        found = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = [v for v in found if v is not None]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(
                    f"vlprune supports image inputs only; task {task!r} gave {type(v).__name__}"
                )
        return [v.convert("RGB") for v in visuals]

    def _encode(self, prompts: list[str], images: list[list[Image.Image]]) -> Any:
        flat = [img for row in images for img in row]
        if flat and self.family in NESTED_IMAGES:
            flat = [row for row in images if row]
        inputs = self.processor(text=prompts, images=flat or None, padding=True,
                                return_tensors="pt")
        return inputs.to(self._device, self._model.dtype)

    def _record(self, reqs: list[Instance], inputs: Any, images: list[list[Image.Image]],
                new_tokens: list[int]) -> list[SampleStats]:
        stats = sample_stats(
            self._model.config, inputs["input_ids"], inputs["attention_mask"],
            [len(row) for row in images], self.handle.stats if self.handle else None,
        )
        for req, st, n_new in zip(reqs, stats, new_tokens):
            if (req.metadata or {}).get("__padding_only__"):
                continue
            row = {"task": req.task_name, "doc_id": req.doc_id, **self.settings, **st.as_dict(),
                   "new_tokens": n_new}
            if self._flops is not None:
                row["llm_prefill_flops"] = self._flops(st)
            self.records.append(row)
            logger.debug(f"vlprune sample: {json.dumps(row)}")
        return stats

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Batched generation; ``until`` strings cut the decoded text."""
        start, first = time.perf_counter(), len(self.records)
        keys = [(r.task_name + json.dumps(r.args[1], sort_keys=True, default=str), len(r.args[0]))
                for r in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        for batch in _batches(keys, self.batch_size):
            reqs = [requests[i] for i in batch]
            for i, out in zip(batch, self._generate(reqs)):
                results[i] = out
        self._summarise(first, time.perf_counter() - start)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, reqs: list[Instance]) -> list[GenerationResult]:
        gen = dict(reqs[0].args[1] or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        images = [self._visuals(r, r.args[2]) for r in reqs]
        prompts = [build_prompt(self.processor, self.family, r.args[0], len(im))
                   for r, im in zip(reqs, images)]
        inputs = self._encode(prompts, images)
        temperature = float(gen.get("temperature") or 0.0)
        sample = temperature > 0 or bool(gen.get("do_sample", False))
        kwargs = {"temperature": temperature, "top_p": gen.get("top_p")} if sample else {}
        out = self._model.generate(
            **inputs,
            max_new_tokens=int(gen.get("max_new_tokens", 1024)),
            do_sample=sample,
            num_beams=int(gen.get("num_beams") or 1),
            pad_token_id=self.tokenizer.pad_token_id,
            **kwargs,
        )
        new = out[:, inputs["input_ids"].shape[1]:]
        counts = (new != self.tokenizer.pad_token_id).sum(1).tolist()
        stats = self._record(reqs, inputs, images, counts)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [
            GenerationResult(truncate_at(text, until),
                             TokenCounts(input_tokens=st.llm_tokens, output_tokens=n))
            for text, st, n in zip(texts, stats, counts)
        ]

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, greedy)``: the continuation's mean negative log-likelihood per
        token and whether greedy decoding yields it.

        lmms-eval's convention: its HF models return the loss, and its multiple-choice scoring
        picks the choice with the smallest value. The continuation is appended to the prompt
        and scored in one (pruned) forward; decoder methods that rank tokens by the last prompt
        token therefore see the continuation's last token there. Each pair is wrapped in a
        ``GenerationResult``: lmms-eval 0.7.3's evaluator (``unwrap_generation_output``) turns a
        bare ``(float, bool)`` into its string, which breaks every multiple-choice task, and
        passes a ``GenerationResult``'s payload through unchanged.
        """
        start, first = time.perf_counter(), len(self.records)
        keys = [(r.task_name, len(r.args[0]) + len(str(r.args[1]))) for r in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        for batch in _batches(keys, self.batch_size):
            reqs = [requests[i] for i in batch]
            for i, out in zip(batch, self._score(reqs)):
                results[i] = out
        self._summarise(first, time.perf_counter() - start)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score(self, reqs: list[Instance]) -> list[GenerationResult]:
        images = [self._visuals(r, r.args[2]) for r in reqs]
        prompts, n_cont = [], []
        for req, im in zip(reqs, images):
            context, target = req.args[0], req.args[1]
            if callable(target):
                task, split, doc_id = req.args[-2], req.args[-1], req.args[-3]
                target = target(self.task_dict[task][split][doc_id])
            prompt = build_prompt(self.processor, self.family, context, len(im))
            tokens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                      for t in (prompt, prompt + str(target))]
            prompts.append(prompt + str(target))
            n_cont.append(max(1, tokens[1] - tokens[0]))
        inputs = self._encode(prompts, images)
        k = max(n_cont)
        logits = self._model(**inputs, use_cache=False, logits_to_keep=k + 1).logits[:, -k - 1:-1]
        logprobs = logits.float().log_softmax(-1)
        targets = inputs["input_ids"][:, -k:]
        stats = self._record(reqs, inputs, images, [0] * len(reqs))
        out = []
        for row, (n, st) in enumerate(zip(n_cont, stats)):
            lp, tgt = logprobs[row, -n:], targets[row, -n:]
            loss = -float(lp.gather(1, tgt.unsqueeze(1)).mean())
            greedy = bool((lp.argmax(-1) == tgt).all())
            out.append(GenerationResult((loss, greedy),  # type: ignore[arg-type]
                                        TokenCounts(input_tokens=st.llm_tokens)))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vlprune lmms-eval model does not support multi-round tasks")

    # ---- summary -------------------------------------------------------------------------

    def _summarise(self, first: int, seconds: float) -> None:
        """Write this rank's samples of the call; rank 0 gathers all ranks' samples, logs and
        writes the summary of the whole run, and reports this call's means to lmms-eval."""
        new = self.records[first:]
        if self.stats_path is not None:
            self.stats_path.mkdir(parents=True, exist_ok=True)
            with open(self.stats_path / f"samples_rank{self.rank}.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in new)
        if self.world_size > 1 and torch.distributed.is_initialized():
            parts: list[list[dict[str, Any]] | None] = [None] * self.world_size
            torch.distributed.all_gather_object(parts, new)
            new = [row for part in parts for row in (part or [])]
        if self.rank != 0 or not new:
            return
        self._all_records.extend(new)
        summary = {**summarise(self._all_records), "settings": self.settings}
        logger.info(f"vlprune summary: {json.dumps(summary)}")
        if self.stats_path is not None:
            (self.stats_path / "summary.json").write_text(json.dumps(summary, indent=2))
        _log_to_lmms_eval(summarise(new), seconds, sum(row["new_tokens"] for row in new))


def _log_to_lmms_eval(summary: dict[str, Any], seconds: float, new_tokens: int) -> None:
    """Report one call's means through lmms-eval's metric log, which its results JSON carries
    as ``throughput["avg_vlprune_mean_*"]`` (averaged over calls, i.e. request types)."""
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    extra = {f"vlprune_{k}": v for k, v in summary.items() if k.startswith("mean_")}
    speed = new_tokens / seconds if seconds > 0 else 0.0
    log_metrics(total_elapsed_time=seconds, total_gen_tokens=new_tokens, avg_speed=speed,
                additional_metrics=extra)


def _llm_flops_fn(model: torch.nn.Module, family: str) -> Callable[[SampleStats], float] | None:
    """Exact analytic prefill FLOPs of the decoder layers for one sample's ``layer_tokens``
    (``vlprune.eval.profiler``), or ``None`` where the profiler is not available or does not
    model the architecture (hybrid decoders)."""
    try:
        from vlprune.eval.profiler.flops import RunTokens, arch_from_config, exact_flops
    except ImportError:
        return None
    try:
        arch = arch_from_config(model.config, family)
    except NotImplementedError:
        return None
    return lambda st: exact_flops(arch, RunTokens(list(st.layer_tokens), images=[])).llm


__all__ = [
    "MODEL_CLASSES",
    "SampleStats",
    "VLPrune",
    "build_prompt",
    "load_processor",
    "manifest",
    "sample_stats",
    "summarise",
]
