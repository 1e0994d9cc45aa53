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
- ``dtype`` (``auto``: the checkpoint's dtype on CUDA, float32 on CPU, where half precision
  is slow and its sums depend on the batch), ``attn_implementation`` (``sdpa``), ``device``,
  ``revision``, ``chat_template`` (a Jinja string or file replacing the checkpoint's template).
- any other key is a method option, e.g. ``layer=3`` for ``fastv``.

Every argument is checked before anything loads (:func:`~vlprune.eval.lmms_load.check_model_args`).
Prompts (:mod:`vlprune.eval.lmms_prompts`): the checkpoint's processor chat template when it has
one (``chat_template.jinja`` / ``.json``; the shipped toy LLaVA has one), one user turn holding
the request's images and text. Without a template (e.g. the tiny test checkpoints) the prompt
is plain: one image placeholder per image, a newline, the task text. A ``<image>`` inside the
task text marks where an image goes (lmms-eval's convention); images without a mark go first.
Per-sample stats: :mod:`vlprune.eval.lmms_stats`.

Multi-GPU data parallel: ``accelerate launch --num_processes N -m lmms_eval --model vlprune ...``;
each process loads the model on its own device and lmms-eval shards the requests by rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

import vlprune
from vlprune.eval.lmms_load import MODEL_CLASSES, check_model_args, load_processor, model_family
from vlprune.eval.lmms_prompts import build_prompt, truncate_at
from vlprune.eval.lmms_stats import (
    SampleStats,
    llm_flops_fn,
    log_to_lmms_eval,
    sample_stats,
    summarise,
)

__all__ = ["VLPrune", "manifest"]

NESTED_IMAGES = ("llava_onevision",)
"""Families whose processor takes each prompt's images as one list (LLaVA-OneVision encodes an
image of a multi-image prompt as a thumbnail only, ``batch_num_images``)."""


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: model id ``vlprune`` → :class:`VLPrune`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlprune", simple_class_path="vlprune.eval.lmms.VLPrune")


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
        method_options = check_model_args(
            pretrained, method, budget, ratio, batch_size, device, dtype, attn_implementation,
            **method_options,
        )
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
        self.stats_path = Path(stats_path) if stats_path else None
        self.records: list[dict[str, Any]] = []
        self._all_records: list[dict[str, Any]] = []
        self._flops = llm_flops_fn(self._model, self.family)
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
        if dtype != "auto":
            torch_dtype: Any = getattr(torch, str(dtype))
        else:  # half precision on CPU is slow and batch-dependent
            torch_dtype = "auto" if self._device.type == "cuda" else torch.float32
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
        log_to_lmms_eval(summarise(new), seconds, sum(row["new_tokens"] for row in new))
