"""lmms-eval integration: ``--model vlprune`` end to end on tiny random-weight checkpoints, offline.

The module writes one tiny checkpoint per family (model + processor), a JSON-lines dataset
with PNG images and the task YAMLs of ``tests/eval/lmms_task`` into a temp dir, then:

- runs the real ``lmms-eval`` CLI in subprocesses on LLaVA-1.5 for ``method=none``, ``random``
  and ``fastv`` at batch sizes 1 and 2 (three tasks: one image per document, two images per
  document, multiple choice = loglikelihood requests), one of them through ``vlprune eval``,
  plus a two-process data-parallel run (``torchrun``, gloo on CPU);
- runs ``simple_evaluate`` in-process with a :class:`VLPrune` instance for the other families
  (the Qwen and LLaVA-OneVision checkpoints load their processors without torchvision).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (`bash scripts/setup_dev.sh` installs it)"
)

from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from vlprune.eval import lmms_cli
from vlprune.eval.lmms import VLPrune
from vlprune.eval.lmms_load import IMAGES_ONLY_PROCESSORS, model_family
from vlprune.eval.lmms_prompts import build_prompt, prompt_segments, truncate_at
from vlprune.testing import FAMILIES, tiny_image, tiny_model, tiny_processor

TASK_FILES = Path(__file__).parent / "lmms_task"
TASKS = ("vlprune_tiny", "vlprune_tiny_multi", "vlprune_tiny_mc")
BUDGET = 8
IMAGE_SIZE = (168, 112)
CLI_RUNS = [(method, batch) for method in ("none", "random", "fastv") for batch in (1, 2)]
WRAPPED_RUN = ("random", 2)  # run through `vlprune eval` instead of `lmms-eval`
FAMILY_RUNS = [(f, m) for f in FAMILIES if f != "llava" for m in ("none", "random", "fastv")]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


def expected_kept(method: str, images: int, visual: int) -> int:
    """Visual tokens into the LLM's last layer: ``random`` keeps BUDGET per image, ``fastv``
    BUDGET per request, ``none`` all."""
    return {"none": visual, "random": BUDGET * images, "fastv": BUDGET}[method]


def method_kwargs(method: str) -> dict[str, Any]:
    return {"method": method} if method == "none" else {"method": method, "budget": BUDGET}


def method_args(method: str) -> str:
    """``--model_args`` form of :func:`method_kwargs`."""
    return ",".join(f"{k}={v}" for k, v in method_kwargs(method).items())


# --------------------------------------------------------------------------------------------
# Fixtures: checkpoints, dataset, task YAMLs; the subprocess runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Temp dir with ``data/`` (images, single.jsonl, multi.jsonl), ``tasks/`` and one tiny
    checkpoint per family (Qwen processors saved as parts, like a hub checkpoint)."""
    root = tmp_path_factory.mktemp("lmms")
    data = root / "data"
    data.mkdir()
    images = []
    for i in range(6):
        images.append(str(data / f"img{i}.png"))
        tiny_image(i, IMAGE_SIZE).save(images[-1])
    single = [
        {"question": f"w{3 * i} w{5 * i + 1} w{7 * i + 2}", "answer": "w1",
         "choices": ["w1 w2", "w3"], "images": [images[i]]}
        for i in range(4)
    ]
    multi = [
        {"question": f"w{i} <image> w{i + 10} w{i + 20}", "answer": "w1", "choices": ["w1"],
         "images": [images[4 + i], images[i]]}
        for i in range(2)
    ]
    for name, docs in (("single", single), ("multi", multi)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    for src in TASK_FILES.iterdir():
        if src.suffix in (".py", ".yaml"):
            (tasks / src.name).write_text(src.read_text().replace("DATA_DIR", str(data)))
    for family in FAMILIES:
        target = root / family
        tiny_model(family).save_pretrained(target)
        _save_processor(tiny_processor(family), family, target)
    return root


def _save_processor(processor: Any, family: str, target: Path) -> None:
    """As a hub checkpoint stores it: LLaVA processors whole; Qwen as parts (image processor,
    tokenizer); LLaVA-OneVision with its processor config (placeholder counts) and a video
    processor config (which, without torchvision, makes ``AutoProcessor`` fail)."""
    if family == "llava_onevision":
        kwargs = {k: getattr(processor, k) for k in (
            "num_image_tokens", "vision_feature_select_strategy", "video_token",
            "vision_aspect_ratio")}
        IMAGES_ONLY_PROCESSORS[family](image_processor=processor.image_processor,
                                       tokenizer=processor.tokenizer, **kwargs
                                       ).save_pretrained(target)
        config = json.loads((target / "processor_config.json").read_text())
        config["processor_class"] = "LlavaOnevisionProcessor"
        (target / "processor_config.json").write_text(json.dumps(config))
        video = {"video_processor_type": "LlavaOnevisionVideoProcessor"}
        (target / "video_preprocessor_config.json").write_text(json.dumps(video))
    elif family in IMAGES_ONLY_PROCESSORS:
        processor.image_processor.save_pretrained(target)
        processor.tokenizer.save_pretrained(target)
    else:
        processor.save_pretrained(target)


def _lmms_eval() -> list[str]:
    script = Path(sys.executable).with_name("lmms-eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]


def _common(ws: Path, out: Path, tasks: tuple[str, ...] = TASKS) -> list[str]:
    return ["--tasks", ",".join(tasks), "--include_path", str(ws / "tasks"),
            "--output_path", str(out), "--log_samples"]


def _run(cmd: list[str], ws: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**os.environ, **ENV, "HF_HOME": str(ws / "hf"), **(extra_env or {})}
    proc = subprocess.run(cmd, env=env, cwd=ws, capture_output=True, text=True, timeout=300)
    return {"rc": proc.returncode, "log": proc.stdout[-3000:] + proc.stderr[-6000:]}


@pytest.fixture(scope="module")
def cli_runs(workspace: Path) -> dict[Any, dict[str, Any]]:
    """All subprocess runs, three at a time; per run its exit code, log tail and output dir."""
    ws = workspace
    jobs: dict[Any, tuple[list[str], dict[str, str] | None, Path]] = {}
    for method, batch in CLI_RUNS:
        out = ws / "out" / f"{method}_bs{batch}"
        args = f"pretrained={ws / 'llava'},{method_args(method)},stats_path={out / 'stats'}"
        cli = [*_lmms_eval(), "--model", "vlprune"]
        if (method, batch) == WRAPPED_RUN:  # `vlprune eval` derives stats_path itself
            args = args.rsplit(",stats_path=", 1)[0]
            cli = [sys.executable, "-m", "vlprune.cli", "eval"]
        jobs[(method, batch)] = (
            [*cli, "--model_args", args, "--batch_size", str(batch), *_common(ws, out)],
            None, out,
        )
    out = ws / "out" / "dp"
    jobs["dp"] = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lmms_eval", "--model", "vlprune", "--model_args",
         f"pretrained={ws / 'llava'},{method_args('random')},stats_path={out / 'stats'}",
         "--batch_size", "2", *_common(ws, out, ("vlprune_tiny", "vlprune_tiny_mc"))],
        {"ACCELERATE_USE_CPU": "true"}, out,
    )
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: pool.submit(_run, cmd, ws, env) for key, (cmd, env, _) in jobs.items()}
        return {key: {**fut.result(), "out": jobs[key][2]} for key, fut in futures.items()}


def _check_rc(run: dict[str, Any]) -> None:
    assert run["rc"] == 0, run["log"]


def _results(out: Path) -> dict[str, Any]:
    (path,) = out.rglob("*_results.json")
    return json.loads(path.read_text())


def _samples(out: Path, task: str) -> dict[int, dict[str, Any]]:
    """lmms-eval's logged samples of ``task`` by doc id."""
    (path,) = out.rglob(f"*_samples_{task}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["doc_id"]: row for row in rows}


def _stats_dir(out: Path) -> Path:
    """``stats_path``: given explicitly, or ``vlprune eval``'s default under the output path."""
    return out / "stats" if (out / "stats").exists() else out / "vlprune_stats"


def _stats(out: Path) -> list[dict[str, Any]]:
    """vlprune's per-sample stats rows of all ranks."""
    return [json.loads(line) for path in sorted(_stats_dir(out).glob("samples_rank*.jsonl"))
            for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# The lmms-eval CLI, end to end


@pytest.mark.parametrize(("method", "batch"), CLI_RUNS)
def test_cli_run_writes_results_samples_and_stats(
    cli_runs: dict[Any, dict[str, Any]], method: str, batch: int
) -> None:
    """``lmms-eval --model vlprune`` succeeds; results, lmms-eval's per-sample logs and
    vlprune's per-sample stats are written; kept tokens per sample match the budget; the
    per-sample input tokens lmms-eval logs are vlprune's tokens into the LLM."""
    run = cli_runs[(method, batch)]
    _check_rc(run)
    results = _results(run["out"])
    assert set(TASKS) <= set(results["results"])
    assert results["throughput"]["avg_vlprune_mean_kept_tokens"] > 0
    stats = _stats(run["out"])
    n_requests = {"vlprune_tiny": 4, "vlprune_tiny_multi": 2, "vlprune_tiny_mc": 8}
    for task, n in n_requests.items():
        assert sum(row["task"] == task for row in stats) == n
    for row in stats:
        assert row["method"] == method
        assert row["visual_tokens"] == 36 * row["images"]
        assert row["kept_tokens"] == expected_kept(method, row["images"], row["visual_tokens"])
        assert len(row["layer_tokens"]) == 4
        assert row["llm_tokens"] == row["layer_tokens"][0]
    summary = json.loads((_stats_dir(run["out"]) / "summary.json").read_text())
    assert summary["samples"] == len(stats)
    assert summary["mean_kept_tokens"] == pytest.approx(
        sum(r["kept_tokens"] for r in stats) / len(stats))
    for task in ("vlprune_tiny", "vlprune_tiny_multi"):
        by_doc = {r["doc_id"]: r for r in stats if r["task"] == task}
        for doc_id, sample in _samples(run["out"], task).items():
            assert sample["token_counts"][0]["input_tokens"] == by_doc[doc_id]["llm_tokens"]
            assert sample["token_counts"][0]["output_tokens"] == by_doc[doc_id]["new_tokens"]


def test_cli_fastv_prunes_from_layer_2(cli_runs: dict[Any, dict[str, Any]]) -> None:
    """FastV: all prompt tokens enter layers 0-1, the pruned sequence layers 2-3."""
    run = cli_runs[("fastv", 1)]
    _check_rc(run)
    for row in _stats(run["out"]):
        full, pruned = row["prompt_tokens"], row["prompt_tokens"] - row["visual_tokens"] + BUDGET
        assert row["layer_tokens"] == [full, full, pruned, pruned]


@pytest.mark.parametrize("method", ["none", "random", "fastv"])
def test_cli_batch_2_equals_batch_1(cli_runs: dict[Any, dict[str, Any]], method: str) -> None:
    """Left-padded batches of 2 give the same generations, loglikelihoods and stats as batch 1."""
    one, two = cli_runs[(method, 1)], cli_runs[(method, 2)]
    _check_rc(one)
    _check_rc(two)
    for task in ("vlprune_tiny", "vlprune_tiny_multi"):
        a, b = _samples(one["out"], task), _samples(two["out"], task)
        assert {d: s["filtered_resps"] for d, s in a.items()} == {
            d: s["filtered_resps"] for d, s in b.items()}
    a, b = _samples(one["out"], "vlprune_tiny_mc"), _samples(two["out"], "vlprune_tiny_mc")
    for doc_id, sample in a.items():
        for (loss_a, greedy_a), (loss_b, greedy_b) in zip(
            sample["filtered_resps"], b[doc_id]["filtered_resps"]
        ):
            assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-4)
            assert greedy_a == greedy_b

    def key(row: dict[str, Any]) -> tuple:
        return row["task"], row["doc_id"], row["prompt_tokens"]

    assert sorted(_stats(one["out"]), key=key) == sorted(_stats(two["out"]), key=key)


def test_vlprune_eval_wrapper(cli_runs: dict[Any, dict[str, Any]]) -> None:
    """``vlprune eval`` preselects ``--model vlprune`` and writes the stats under
    ``--output_path``."""
    run = cli_runs[WRAPPED_RUN]
    _check_rc(run)
    assert _results(run["out"])["config"]["model"] == "vlprune"
    assert (run["out"] / "vlprune_stats" / "summary.json").exists()


def test_data_parallel_two_processes(cli_runs: dict[Any, dict[str, Any]]) -> None:
    """Two ranks (torchrun, gloo on CPU) share the requests; rank 0 summarises all of them and
    the generations equal the single-process run's."""
    run = cli_runs["dp"]
    _check_rc(run)
    per_rank = [len(p.read_text().splitlines())
                for p in sorted((run["out"] / "stats").glob("samples_rank*.jsonl"))]
    assert per_rank == [6, 6]  # (4 generation + 8 loglikelihood requests) / 2
    summary = json.loads((run["out"] / "stats" / "summary.json").read_text())
    assert summary["samples"] == 12
    assert summary["mean_kept_tokens"] == BUDGET
    single = cli_runs[WRAPPED_RUN]
    _check_rc(single)
    a, b = _samples(run["out"], "vlprune_tiny"), _samples(single["out"], "vlprune_tiny")
    assert {d: s["filtered_resps"] for d, s in a.items()} == {
        d: s["filtered_resps"] for d, s in b.items()}


# --------------------------------------------------------------------------------------------
# The other families, in-process through lmms-eval's simple_evaluate


@pytest.fixture(scope="module")
def task_manager(workspace: Path) -> TaskManager:
    """Our tasks only; the datasets are local files (cache in the workspace)."""
    return TaskManager("WARNING", include_path=str(workspace / "tasks"), include_defaults=False)


def _evaluate(lm: VLPrune, task_manager: TaskManager) -> dict[str, Any]:
    return simple_evaluate(model=lm, tasks=list(TASKS[:2]), task_manager=task_manager,
                           log_samples=True, verbosity="WARNING")


@pytest.mark.parametrize(("family", "method"), FAMILY_RUNS)
def test_family_generations(
    workspace: Path, task_manager: TaskManager, family: str, method: str
) -> None:
    """Every family but LLaVA-1.5 (the CLI runs above): the family comes from the checkpoint,
    kept tokens match the budget, and batch 2 generates what batch 1 does. LLaVA-OneVision
    encodes the images of the two-image task as thumbnails (``batch_num_images``)."""
    outputs, records = [], []
    for batch in (1, 2):
        lm = VLPrune(pretrained=str(workspace / family), batch_size=batch,
                     **method_kwargs(method))
        assert lm.family == family
        result = _evaluate(lm, task_manager)
        outputs.append({t: [s["filtered_resps"] for s in result["samples"][t]] for t in TASKS[:2]})
        records.append(sorted(lm.records, key=lambda r: (r["task"], r["doc_id"])))
    assert outputs[0] == outputs[1]
    assert records[0] == records[1]
    for row in records[0]:
        assert row["kept_tokens"] == expected_kept(method, row["images"], row["visual_tokens"])
    if family == "llava_onevision":
        multi = [r for r in records[0] if r["task"] == "vlprune_tiny_multi"]
        assert multi and all(r["visual_tokens"] == 2 * 37 for r in multi)


def test_chat_template_prompt(workspace: Path, task_manager: TaskManager) -> None:
    """With a chat template (here passed as ``chat_template=<file>``) the prompt comes from
    ``apply_chat_template``: images where the task put them, generation prompt appended."""
    template = workspace / "template.jinja"
    template.write_text(
        "{% for m in messages %}w900 {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}w901{% endif %}"
    )
    lm = VLPrune(pretrained=str(workspace / "llava"), method="random", budget=BUDGET,
                 chat_template=str(template))
    prompt = build_prompt(lm.processor, "llava", "w1 <image> w2", 2)
    assert prompt == "w900 <image> w1 <image> w2 w901"
    result = _evaluate(lm, task_manager)
    assert len(result["samples"]["vlprune_tiny_multi"]) == 2
    assert all(r["kept_tokens"] == BUDGET * r["images"] for r in lm.records)


# --------------------------------------------------------------------------------------------
# Pure helpers and errors


def test_prompt_segments() -> None:
    """Marked images go where the text puts them, unmarked ones first, surplus marks vanish."""
    assert prompt_segments("w1 w2", 1) == [None, "w1 w2"]
    assert prompt_segments("w1 <image> w2", 2) == [None, "w1 ", None, " w2"]
    assert prompt_segments("<image>w1", 1) == [None, "w1"]
    assert prompt_segments("w1 <image> w2 <image>", 1) == ["w1 ", None, " w2 "]
    assert prompt_segments("w1", 0) == ["w1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_prompt_without_chat_template(family: str) -> None:
    """No chat template (the tiny tokenizer has none): placeholder + newline per leading image,
    the task text as is."""
    processor = tiny_processor(family)
    assert processor.chat_template is None
    image = processor.image_token
    if family.startswith("qwen"):
        image = f"<|vision_start|>{image}<|vision_end|>"
    assert build_prompt(processor, family, "w1 w2", 1) == f"{image}\nw1 w2"
    assert build_prompt(processor, family, "w1 <image> w2", 2) == f"{image}\nw1 {image} w2"


def test_truncate_at() -> None:
    assert truncate_at("w1 w2 </s> w3", ["</s>"]) == "w1 w2 "
    assert truncate_at("w1 w2", ["", "w9"]) == "w1 w2"


def test_wrapper_arguments() -> None:
    """``vlprune eval`` adds ``--model vlprune``, a stats path under ``--output_path`` and,
    unless given, the include path of the shipped toy tasks."""
    argv = lmms_cli.lmms_eval_argv(["--model_args", "pretrained=x", "--output_path", "o"])
    assert argv == ["--model", "vlprune", "--model_args",
                    f"pretrained=x,stats_path={os.path.join('o', 'vlprune_stats')}",
                    "--output_path", "o", "--include_path", str(lmms_cli.TOY_TASKS)]
    argv = ["--model_args=pretrained=x,stats_path=s", "--output_path=o", "--include_path=t"]
    assert lmms_cli.lmms_eval_argv(argv) == ["--model", "vlprune", *argv]
    with pytest.raises(SystemExit, match="preselected"):
        lmms_cli.lmms_eval_argv(["--model", "llava_hf"])


def test_errors(workspace: Path, tmp_path: Path) -> None:
    """Unsupported checkpoints, options without a method and ``batch_size=auto`` are refused."""
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama' model"):
        model_family(str(tmp_path))
    with pytest.raises(ValueError, match="method=none takes no method options"):
        VLPrune(pretrained=str(workspace / "llava"), layer=2)
    with pytest.raises(ValueError, match="batch_size"):
        VLPrune(pretrained=str(workspace / "llava"), batch_size="auto")
    with pytest.raises(ValueError, match="unknown `method`"):
        VLPrune(pretrained=str(workspace / "llava"), method="nope", budget=BUDGET)


def test_model_args_are_read_as_each_option_means() -> None:
    """lmms-eval parses ``-2`` as ``-2.0``, ``None`` as a string and ``[1,2]`` as text;
    ``check_model_args`` reads them as the method's declared options mean them, and refuses
    bad loading arguments before anything loads."""
    from lmms_eval.utils import simple_parse_args_string

    from vlprune.eval.lmms_load import check_model_args
    from vlprune.eval.toy.model import CHECKPOINT_DIR

    def check(text: str) -> dict[str, Any]:
        return check_model_args(**simple_parse_args_string(f"pretrained={CHECKPOINT_DIR},{text}"))

    options = check("method=hiprune,budget=64,object_layer=None,deep_layer=-1,alpha=0.25")
    assert options == {"object_layer": None, "deep_layer": -1, "alpha": 0.25}
    assert type(options["deep_layer"]) is int
    assert check("method=transprune,ratio=0.25,layers=[1,2],ratios=[0.5,0.25]") == {
        "layers": [1, 2], "ratios": [0.5, 0.25]}
    assert check("method=none") == {}
    for text, match in [("method=hiprune,budget=64,deep_layer=-1.5", "deep_layer"),
                        ("method=fixed,budget=4,indices=[0]", "unknown `method`"),
                        ("method=none,batch_size=auto", "batch_size"),
                        ("method=none,dtype=float8", "dtype"),
                        ("method=none,attn_implementation=flex", "attn_implementation")]:
        with pytest.raises(ValueError, match=match):
            check(text)
    with pytest.raises(ValueError, match="neither a local checkpoint"):
        check_model_args(pretrained="./no/such/folder")
