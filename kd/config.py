"""One typed run configuration: `RunConfig` and its parts.

Defaults live only here. Presets in `configs/*.yaml` are instances of it:

    cfg = load_config("configs/smoke.yaml", ["kd.alpha=0.5", "train.steps=10"])

Validation errors are turned into `ConfigError` messages that name the field
(`kd.temperature: must be > 0, got -1`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd.cross_tokenizer.settings import CrossTokenizerConfig
from kd.errors import ConfigError
from kd.teacher_server.config import TeacherServerConfig

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class _Part(BaseModel):
    # allow_inf_nan=False: every float is finite. Bounds are Field(gt=..., le=...) constraints, not
    # validators, so the JSON schema (the Prefect form, the server's parameter check) enforces them too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_list_is_default(cls, data: Any) -> Any:
        """Prefect's parameter check lets `null` through for any array (a cleared list in the UI form):
        take it as the field's default instead of failing the run on the worker."""
        if isinstance(data, dict):
            lists = [n for n, f in cls.model_fields.items() if getattr(f.annotation, "__origin__", None) in (list, dict)]
            data = {k: v for k, v in data.items() if not (v is None and k in lists)}
        return data


FROM_TEACHER = "from-teacher"


class PruneSpec(_Part):
    """Which teacher decoder layers a pruned student keeps: `keep_layers` chosen by `strategy`, or `layers` exactly."""

    keep_layers: int | None = Field(
        None, gt=0, description="Keep this many decoder layers, chosen by `strategy`; the first and last are "
        "always kept."
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Keep exactly these teacher decoder layers (0-based, increasing)."
    )
    strategy: Literal["measured", "block-influence", "even"] = Field(
        "measured", description="How `keep_layers` are chosen (kd/layer_choice.py; ignored with `layers`). "
        "`measured`: greedy removal on calibration text from the run's prepared training split: repeatedly drop "
        "the layer whose removal raises the pruned stack's calibration loss least (SmolLM2-135M keeping 20 of 30, "
        "before training: held-out bits/byte 1.55 vs 4.03 evenly spaced, teacher 1.02; "
        "bench/results/layer_choice-2026-12-04.json). `block-influence`: keep the layers with the largest "
        "1 - mean cos(h_in, h_out) (ShortGPT). `even`: evenly spaced, no measurement. Per-layer scores go in the "
        "student's `init` in the manifest and the pull_models artifact."
    )
    calibration_tokens: int = Field(
        512, ge=16, le=65536, description="Tokens of the run's prepared training split (whole blocks of "
        "data.seq_len, spread over the split) the `measured` and `block-influence` strategies score layers on."
    )
    calibration: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="Text the layers are scored on instead of the training split: bundled:NAME, a .txt file "
        "(one document a line) or a folder of them; its first calibration_tokens tokens, in blocks of 128. For "
        "training data the teacher wrote itself: its loss on its own samples is low whatever layers it keeps, so "
        "they rank layers by how they carry its sampling, not its knowledge (docs/recipe.md). Never "
        "eval.reference_text: the out-of-domain verdict must not have chosen the student."
    )

    @model_validator(mode="after")
    def _one_of(self) -> "PruneSpec":
        if (self.keep_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of keep_layers or layers")
        if self.layers is not None and sorted(set(self.layers)) != self.layers:
            raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        return self

    @property
    def measured(self) -> bool:
        """Whether the choice needs calibration text (and so depends on it)."""
        return self.keep_layers is not None and self.strategy != "even"


class ModelInit(_Part):
    """How a student is initialised when it is not pulled."""

    from_teacher: PruneSpec = Field(
        description="Depth pruning (Minitron, DistilBERT): the teacher's embeddings, the chosen decoder layers, "
        "its final norm and head, with the teacher's tokenizer."
    )
    tokenizer: Literal["gpt2", "qwen2", "llama3", "phi3", "smollm2"] | None = Field(
        None, description="Cross-tokenizer (issue 30): give the pruned student this tokenizer (kd/cross_tokenizer/"
        "vocab_files.py: real tokenizers offline) by transplanting its embeddings and head (a new token that is "
        "byte-identical to a teacher token keeps its row, others the mean of their pieces' rows; "
        "kd/cross_tokenizer/transplant.py). Needs kd.cross_tokenizer.enabled. None: the teacher's tokenizer. "
        "Chat template: the named tokenizer's own (qwen2, phi3); gpt2 and llama3 ship none, so the student takes "
        "the teacher's template text, tokenized by its own tokenizer (recorded as `chat_template: teacher` in the "
        "init report; docs/cross-tokenizer.md)."
    )


class ModelRef(_Part):
    """Where a model comes from: a hub repo at a revision, a local folder, or a generated tiny model."""

    model_config = ConfigDict(regex_engine="python-re")  # the `repo` pattern needs a look-ahead

    repo: str = Field(
        description="Hub repo id (`Qwen/Qwen2.5-0.5B`), a local folder path, a local `.gguf` file, "
        "`pkg:DIST/FILE` (a model file inside an installed Python package), `tiny:teacher` / "
        "`tiny:student` for the deterministic tiny models kdflow generates itself, or `from-teacher` (with init).",
        min_length=1,
        pattern=r"^(?!tiny:)|^tiny:(teacher|student)$",
    )
    revision: str = Field(
        "main",
        description="Hub branch, tag or 40-hex commit to pin. Ignored for local folders and tiny models.",
        min_length=1,
    )
    trust_remote_code: bool = Field(
        False, description="Allow the repo's own Python code to run when loading (off: security default)."
    )
    # --- real models (issue 11): GGUF files and students pruned from the teacher
    gguf_file: str | None = Field(
        None, min_length=1,
        description="A GGUF file (llama.cpp format, e.g. `model.Q4_K_M.gguf`) in the hub repo `repo`: pulled, "
        "sha256-verified, dequantized to the training dtype and converted once to a Hugging Face folder. "
        "A local GGUF file is given directly as `repo` (a path ending in `.gguf`).",
    )
    init: ModelInit | None = Field(
        None, description="Students only: build this model from the teacher instead of pulling one "
        "(`repo` must then be `from-teacher`).",
    )
    server: TeacherServerConfig | None = Field(
        None, description="Teacher only: the teacher served by an inference engine (vLLM): `url` of a running "
        "one or `launch: vllm`; the cache step asks it for top-k log-probs, and with kd.on_policy.fraction > 0 "
        "it scores the student's samples (kd/teacher_server/). Needs kd.teacher_mode: offline.",
    )

    @property
    def kind(self) -> Literal["hub", "local", "tiny", "pruned"]:
        if self.init is not None:
            return "pruned"
        if self.repo.startswith("tiny:"):
            return "tiny"
        if self.repo.startswith(("/", "./", "../", "~")) or self.repo.lower().endswith(".gguf") \
                or Path(self.repo).expanduser().is_dir():
            return "local"
        return "hub"

    @property
    def is_gguf(self) -> bool:
        """A GGUF source: a local `.gguf` file, or a hub repo with `gguf_file`."""
        return self.init is None and (self.gguf_file is not None or self.repo.lower().endswith(".gguf"))

    @field_validator("repo")
    @classmethod
    def _packaged_file(cls, v: str) -> str:
        """`pkg:DIST/FILE` (a model file shipped in a Python wheel) -> its absolute path on this machine."""
        if not v.startswith("pkg:"):
            return v
        from kd.errors import ModelError
        from kd.gguf import packaged_file

        try:
            return str(packaged_file(v))
        except ModelError as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _init_means_from_teacher(self) -> "ModelRef":
        if (self.init is not None) != (self.repo == FROM_TEACHER):
            raise ValueError(f"repo `{FROM_TEACHER}` and init.from_teacher go together (a student built from "
                             f"the teacher's layers), got repo={self.repo!r}, init={self.init}")
        if self.gguf_file is not None and self.kind != "hub":
            raise ValueError("gguf_file names a file in a hub repo; give a local GGUF file as repo instead")
        return self

    # the pattern puts the rule in the JSON schema (UI form, server); this gives it a readable message
    @field_validator("repo", mode="before")
    @classmethod
    def _repo_shape(cls, v: str) -> str:
        if isinstance(v, str) and v.startswith("tiny:") and v not in ("tiny:teacher", "tiny:student"):
            raise ValueError(f"tiny models are `tiny:teacher` or `tiny:student`, got {v!r}")
        return v


class DataConfig(_Part):
    """Training and held-out text."""

    source: str = Field(
        "smoke",
        description="`smoke` (the corpus bundled with kdflow), `bundled:NAME` (data shipped inside kdflow, "
        "e.g. `bundled:english`, `bundled:chat/genesis-chat.jsonl`: found wherever kdflow runs), a local "
        ".txt/.jsonl/.parquet file or folder (relative to the current folder), or `hf-dataset:owner/name` "
        "(files of a hub dataset repo).",
        min_length=1,
    )
    revision: str = Field("main", description="Revision of a hub dataset source.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet records.")
    seq_len: int = Field(64, gt=1, description="Tokens per packed training block (≤ the models' context).")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="Fraction of documents kept aside (deterministically, whole documents) for eval."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Read at most this many tokens from the source (None: all of it)."
    )
    # --- prepared data (E12): format, masking, packing, bad records
    format: Literal["auto", "text", "chat", "prompt_completion"] = Field(
        "auto",
        description="Record format. auto: chat if the first record has `messages_field`, prompt_completion if "
        "it has `prompt_field` and `completion_field`, else text.",
    )
    messages_field: str = Field("messages", description="Field holding a chat record's list of {role, content}.")
    prompt_field: str = Field("prompt", description="Prompt field of prompt_completion records.")
    completion_field: str = Field("completion", description="Completion field of prompt_completion records.")
    train_on: Literal["assistant", "assistant_last", "all"] = Field(
        "assistant",
        description="Tokens that carry the loss in chat data: every assistant turn, the last one only, or all "
        "tokens. prompt_completion: assistant = the completion, all = prompt and completion.",
    )
    overlong: Literal["auto", "split", "truncate", "drop", "error"] = Field(
        "auto",
        description="Records longer than seq_len: split into seq_len pieces, truncate, drop (counted) or error. "
        "auto: split for text, truncate for chat and prompt_completion.",
    )
    bad_records: Literal["error", "skip"] = Field(
        "error",
        description="Null, empty or non-string text, unknown roles, conversations with no assistant turn or no "
        "loss token: error (exit 2 naming file, line and field) or skip them and count them in the evidence.",
    )
    pack: bool = Field(
        True,
        description="Pack several documents per block (position ids restart per document and attention is "
        "block-diagonal, so nothing attends across documents). False: one document per block, padded.",
    )
    num_proc: int = Field(
        2, gt=0, le=64, description="Processes that tokenise in parallel (datasets.map num_proc)."
    )
    prepared_dir: str | None = Field(
        None,
        description="Where prepared sets are kept, one content-addressed folder each. None: $KDFLOW_HOME/prepared.",
    )


class OnPolicyConfig(_Part):
    """On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM): the student samples completions of prompts
    from the prepared data and learns to match the teacher on its own tokens (kd/train/on_policy/)."""

    fraction: float = Field(
        0.0, ge=0, le=1,
        description="Share of micro-batches trained on sampled completions (GKD's lambda): 0 = off-policy only "
        "(the prepared text), 1 = purely on-policy; in between a seeded draw per (step, micro-batch) decides.",
    )
    seq_kd: bool = Field(
        False, description="Sequence-level KD (Kim & Rush 2016; GKD's seq_kd): the micro-batches not drawn "
        "on-policy get completions generated by the teacher instead of the prepared text (as TRL's GKDTrainer).",
    )
    divergence: Divergence = Field(
        "reverse_kl", description="Divergence on generated batches (prepared-text batches keep kd.divergence): "
        "reverse_kl = KL(student||teacher), the per-token objective of on-policy distillation; jsd uses "
        "kd.jsd_beta; forward_kl available.",
    )
    loss_temperature: float = Field(
        1.0, gt=0, le=100, description="Softmax temperature of the divergence on generated batches (kd.temperature "
        "stays the prepared-text one). Generated batches use no CE term (alpha 0): their labels are sampled draws.",
    )
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature of the generator.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this "
                         "much probability (1: no cut).")
    max_new_tokens: int = Field(
        32, ge=1, le=8192, description="Largest completion length; generation stops earlier at EOS / end of turn.",
    )
    prompt_tokens: int = Field(
        16, ge=1, le=8192, description="Text data: the prompt is this many tokens from the start of a document "
        "(chat data: the conversation before a trained assistant turn; prompt_completion: the prompt).",
    )
    max_prompt_tokens: int = Field(
        192, ge=1, le=8192, description="Longest prompt kept; longer prompts keep their last tokens (left cut).",
    )
    generator: Literal["transformers"] = Field(
        "transformers", description="Generation backend (kd/train/on_policy/generation.py GENERATORS): transformers = "
        "in-process `generate` with KV cache on the training device. The seam for a serving engine (vLLM) is "
        "the Generator protocol there; none other is implemented.",
    )

    @property
    def enabled(self) -> bool:
        """Any micro-batch is generated (by the student or, seq_kd, the teacher)."""
        return self.fraction > 0 or self.seq_kd


class KDConfig(_Part):
    """The distillation objective: `alpha·CE + (1 − alpha)·T²·D(teacher_T, student_T)`."""

    alpha: float = Field(0.3, ge=0, le=1, description="Weight of the hard-label cross-entropy term.")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T for the divergence term (> 0).")
    divergence: Divergence = Field(
        "forward_kl",
        description="forward_kl = KL(teacher||student) (Hinton 2015); reverse_kl = KL(student||teacher); "
        "jsd = generalized Jensen-Shannon with jsd_beta (GKD, Agarwal et al. 2024).",
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="β of the generalized JSD (0/1 reduce to the two KLs).")
    chunk_size: int = Field(
        256, gt=0, description="Tokens per chunk in the fused-linear loss: no full [tokens, vocab] logits exist."
    )
    max_dropped_mass: float = Field(
        1e-3,
        ge=0,
        le=1,
        description="Largest mean teacher probability allowed on teacher-only (padding) vocab rows that are cut.",
    )
    # offline teacher (issue 13): kd/teacher_cache, tasks/teacher_cache.py
    teacher_mode: Literal["online", "offline"] = Field(
        "online",
        description="online: the teacher runs at every training step. offline: the cache_teacher_logits step runs "
        "it once over the prepared tokens and stores its top-k log-probs; training reads them and never loads "
        "the teacher. Changing alpha, lr, steps or seed reuses the cache.",
    )
    top_k: int = Field(
        64, gt=0, le=1_000_000,
        description="Offline mode: teacher ids stored per token, plus one tail bucket for the rest (k at least the "
        "vocab size stores everything and makes the loss exact).",
    )
    cache_encoding: Literal["packed", "float32"] = Field(
        "packed",
        description="Offline mode: packed = Elias-Fano id set + quantised log-probs (~2.1 bytes per id); "
        "float32 = uncompressed reference.",
    )
    cache_logprob_bits: int = Field(
        6, ge=2, le=16, description="Offline mode, packed encoding: bits per stored log-prob (gap to the top-1)."
    )
    cache_dir: str | None = Field(
        None,
        description="Offline mode: the store of teacher caches, one content-addressed folder each (share it between "
        "machines to share caches). None: $KDFLOW_HOME/teacher-cache.",
    )
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig,
        description="On-policy distillation: train on completions sampled from the student (or the teacher with "
        "seq_kd), scored by the teacher. fraction 0 (default) = off-policy only.",
    )
    cross_tokenizer: CrossTokenizerConfig = Field(
        default_factory=CrossTokenizerConfig,
        description="Teacher and student with different tokenizers (byte-aligned groups, kd/cross_tokenizer/): "
        "off (default) = a different tokenizer is refused by check_vocab.",
    )


class RendezvousConfig(_Part):
    """torchrun rendezvous for multi-node training (every node runs the same launch; see docs/prefect.md)."""

    nnodes: int = Field(1, ge=1, le=4096, description="Nodes taking part. 1: `torchrun --standalone`.")
    endpoint: str | None = Field(
        None, description="host:port of the c10d rendezvous (reachable from every node) when nnodes > 1.",
        pattern=r"^[A-Za-z0-9._\[\]:-]+:[0-9]{1,5}$",
    )
    id: str = Field("kdflow", description="Rendezvous id shared by the nodes of one job (e.g. the flow run id).",
                    min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    backend: Literal["c10d"] = Field("c10d", description="torchrun rendezvous backend.")
    host: str = Field(
        "127.0.0.1", description="nnodes > 1 without endpoint: the training step hosts the c10d rendezvous store "
        "on a free port and hands HOST:PORT to every node; HOST must reach the step's machine from every node "
        "(127.0.0.1: all nodes on this host).", pattern=r"^[A-Za-z0-9._\[\]:-]+$",
    )


class TrainConfig(_Part):
    """The optimisation loop."""

    steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1.5e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed for torch, python and numpy (data order and init).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype. auto: bf16 autocast on CUDA, float32 on CPU; bfloat16: bf16 autocast "
        "on any device (CPU too, so CI runs the bf16 code paths); float32: no autocast."
    )
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    resume_from: str | None = Field(
        None, description="Checkpoint folder to resume from. None: the last checkpoint of this run, if any."
    )
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    # --- distributed training (issue 14; kd/train/distributed/) ---
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="none: one process. ddp: the student replicated on every rank (DistributedDataParallel). "
        "fsdp: the student sharded with FSDP2 `fully_shard`. ddp/fsdp are launched with torchrun."
    )
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto", description="Processes (ranks) per node for ddp/fsdp. auto: one per visible GPU (on CPU give a number)."
    )
    teacher_sharding: Literal["replicate", "shard"] = Field(
        "replicate", description="fsdp only: shard the frozen teacher like the student (a big teacher) or keep a "
        "full copy on every rank (faster when it fits)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute the student's layer activations in backward (less memory, ~30% more compute)."
    )
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype the student's (master) weights and optimizer state are kept in."
    )
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype gradients are averaged across ranks in (ddp/fsdp)."
    )
    rank_timeout_s: float = Field(
        1800.0, gt=0, le=86400, description="A rank silent (no progress) or blocked in a collective this long fails "
        "the training task; the launcher kills every rank. Must exceed one step plus one checkpoint."
    )
    rendezvous: RendezvousConfig = Field(
        default_factory=RendezvousConfig,
        description="torchrun rendezvous: single node (--standalone) unless nnodes > 1.",
    )


class ShipConfig(_Part):
    """The ship verdict's thresholds (kd/evaluate/ship.py): whether the student is worth deploying, beside the
    pipeline gates. The generation checks always run; retention and on-sample thresholds when a preset sets them."""

    min_reference_retention: float = Field(
        0.9, gt=0, description="Least teacher ÷ student-after bits per byte on eval.reference_text, text the run did "
        "not train on (out-of-domain retention). A run without a reference text cannot be called shippable.")
    min_heldout_retention: float | None = Field(
        0.9, gt=0, description="Least teacher ÷ student-after held-out loss per trained token (same tokens, one "
        "tokenizer: the ratio of their bits per byte). 1 = as good as the teacher on held-out text. null: not a ship "
        "criterion, for a held-out split the teacher wrote itself (sequence-level KD data): the teacher's loss there is "
        "that of its own samples, so the ratio measures authorship; the out-of-domain check then carries retention.")
    max_repetition: float = Field(
        0.5, ge=0, le=1, description="Largest seq-rep-n (share of repeated word n-grams in one completion) of each of "
        "the student's greedy completions; the teacher's own share on the same prompt is allowed when higher.")
    repetition_ngram: int = Field(3, ge=1, le=8, description="n of the repetition measure (word n-grams).")
    min_distinct_ratio: float = Field(
        0.5, ge=0, le=1, description="The student's distinct-2 over its completions must be ≥ this × the teacher's.")
    max_teacher_bits_ratio: float = Field(
        2.0, ge=1, description="The teacher's bits per byte on the student's completions (pooled over prompts, each "
        "token given the prompt and the tokens before it) must be ≤ this × on its own completions of the same "
        "prompts: the teacher finds the student's answers plausible text. Word salad that neither loops nor repeats "
        "a phrase (a 10-layer student under a repetition penalty: 4.4×) fails it; the recipe's student reads at 1.7×.")
    min_retention: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="'task/metric' -> least retention vs the teacher (after ÷ teacher; teacher "
        "÷ after when lower is better), e.g. {'kdflow_bpb/bits_per_byte': 0.9}. Each task must be in eval.benchmarks.tasks.")
    max_on_sample_reverse_kl: float | None = Field(
        None, gt=0, description="Largest KL(student‖teacher) per token on the student's own samples (needs "
        "eval.on_sample_prompts > 0); None: not a ship criterion.")


class BenchmarksConfig(_Part):
    """Downstream benchmarks through lm-evaluation-harness (kd/evaluate/benchmarks.py), run in the eval step."""

    tasks: list[Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")]] = Field(
        default_factory=list, max_length=64,
        description="lm-eval task names. Bundled (no download, built from this run's held-out documents): "
        "kdflow_lastword (LAMBADA-style last word), kdflow_bpb (bits per byte), kdflow_mc (multiple choice); "
        "kdflow_bpb_reference (bits per byte of eval.reference_text) is added whenever tasks are listed. "
        "Any other lm-eval task must have its data offline (local YAML + files, or in the Hugging Face cache). "
        "Empty: no benchmarks.",
    )
    include_paths: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Folders of extra lm-eval task YAMLs (lm_eval --include_path)."
    )
    limit: int | None = Field(
        None, gt=0, description="Score at most this many documents per task (None: all). Keeps a nightly cheap."
    )
    limits: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict, description="Per-task document limit overriding `limit` (task name -> documents)."
    )
    max_length: int = Field(
        512, gt=0, le=1_048_576,
        description="Context length lm-eval uses (rolling windows, truncation). Give it: a model declaring 8,192 "
        "positions would otherwise pad every window to that.",
    )
    batch_size: int = Field(8, gt=0, le=4096, description="lm-eval batch size.")
    bootstrap_iters: int = Field(
        1000, ge=0, le=1_000_000, description="Bootstrap resamples for the stderr of perplexity-like metrics "
        "(0: no stderr at all)."
    )
    require_no_regression: bool = Field(
        False, description="Gate F-DISTILL-BENCH-001: student-after at least as good as student-before on every "
        "metric of every task."
    )
    min_retention: float | None = Field(
        None, gt=0, description="Gate F-DISTILL-BENCH-RETENTION-001: student-after keeps at least this fraction of "
        "the teacher's score on every metric (after÷teacher; teacher÷after when lower is better). None: no gate."
    )


class EvalConfig(_Part):
    """Held-out evaluation and its gates."""

    batch_size: int = Field(8, gt=0, description="Sequences per eval batch.")
    max_batches: int | None = Field(None, gt=0, description="Evaluate at most this many batches (None: all).")
    require_kl_improvement: bool = Field(
        True, description="Gate: student-after KL to the teacher must be below student-before."
    )
    uniform_perplexity_fraction: float = Field(
        0.5,
        gt=0,
        description="Better-than-uniform gate: student-after held-out perplexity must be below this × vocab size "
        "(a uniform guess over the vocab has perplexity = vocab size).",
    )
    max_top_token_share: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Collapse gate: student-after predicting one token at ≥ this share of positions counts as "
        "collapsed (unless the teacher itself is at least as peaked on this data).",
    )
    collapse_entropy_fraction: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Collapse gate: student-after mean entropy ≥ this × log(vocab size) (it predicts the uniform "
        "distribution) counts as collapsed.",
    )
    # --- sample generations (issue 11; kd/samples.py)
    sample_prompts: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["The capital of France is", "Write one sentence about the sea.",
                                 "Once upon a time"],
        max_length=16,
        description="Fixed prompts completed greedily by teacher, student-before and student-after, side by side "
        "in the evidence (samples.md) and the UI. Chat-templated when the tokenizer has a chat template.",
    )
    sample_max_new_tokens: int = Field(
        24, ge=0, le=512, description="Tokens generated per prompt and model (0: no samples)."
    )
    sample_repetition_penalty: float = Field(
        1.0, ge=1.0, le=2.0, description="The decoding the student will be deployed with, for every model's sample "
        "completions alike (and so for the ship verdict's generation checks): greedy, with this repetition penalty "
        "(Keskar et al. 2019, transformers' `repetition_penalty`: a token already in the text has its logit divided "
        "by it when positive, multiplied when negative). 1.0: plain greedy. Serve the student with the same value in "
        "its generation config (Qwen2.5-Instruct ships 1.05, Qwen2-0.5B-Instruct 1.1); samples.md and the verdict "
        "name it.",
    )
    # --- the fine-tuning control (issue 27; kd/evaluate/control.py)
    control: bool = Field(
        False, description="Also train the same student with alpha = 1 (fine-tuning only) on the same data, steps, lr "
        "and seed (one cached step every KD setting shares), and decide F-DISTILL-VALUE-001: distillation beat "
        "fine-tuning, by a paired bootstrap over documents of the reference text (else the held-out split).")
    control_bootstrap_samples: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples of documents.")
    control_confidence: float = Field(0.95, gt=0.5, lt=1, description="Coverage of the KD − control interval.")
    control_bootstrap_seed: int = Field(0, ge=0, description="Seed of the bootstrap (verify recomputes it).")
    control_max_documents: int = Field(
        400, ge=10, le=100_000, description="At most this many documents of each source are scored for the control.")
    heldout_sample_prompts: int = Field(
        4, ge=0, le=64, description="Held-out prompts (chat: the conversation before an assistant turn; text: a prefix) "
        "also completed greedily by the three models, in samples.md and checked by the ship verdict.")
    ship: ShipConfig = Field(default_factory=ShipConfig, description="Thresholds of the ship verdict: is the student "
                             "worth deploying (its outputs, retention), beside the pipeline gates.")
    # --- eval on the student's own samples (issue 17; kd/evaluate/on_samples.py)
    on_sample_prompts: int = Field(
        0, ge=0, le=4096, description="Held-out prompts (chat: the conversation before an assistant turn; text: "
        "kd.on_policy.prompt_tokens tokens) completed by student-before and student-after (sampled at T=1, seeded) "
        "and scored by the teacher: per-token reverse KL and teacher NLL. 0: not measured.",
    )
    on_sample_max_new_tokens: int = Field(
        32, ge=1, le=4096, description="Largest completion per prompt in the on-sample eval (stops at EOS / end of turn).",
    )
    require_on_sample_improvement: bool = Field(
        False, description="Gate F-DISTILL-ONPOLICY-001: student-after's reverse KL to the teacher on its own "
        "samples must be below student-before's on theirs (needs on_sample_prompts > 0).",
    )
    # --- downstream benchmarks (issue 20; kd/evaluate/benchmarks.py)
    benchmarks: BenchmarksConfig = Field(
        default_factory=BenchmarksConfig,
        description="lm-evaluation-harness tasks scored for teacher, student-before and student-after.",
    )
    reference_text: Annotated[str, Field(min_length=1)] | None = Field(
        "bundled:bierce",
        description="Out-of-domain text the run did not train on (a .txt file with one document per line, a .jsonl "
        "with a `text` field, a folder of them, or `bundled:NAME` like data.source), scored as the lm-eval task "
        "kdflow_bpb_reference (bits per byte, passages decontaminated against the training text) whenever "
        "eval.benchmarks lists tasks, so retention on unseen text stands beside the in-domain kdflow_bpb. "
        "Default: bundled:bierce (Bierce's The Devil's Dictionary, public domain). null: none.",
    )

    @model_validator(mode="after")
    def _ship_thresholds_are_measured(self) -> "EvalConfig":
        """A ship threshold on something the run never measures could only ever say don't ship: refuse it."""
        scored = list(self.benchmarks.tasks)
        if scored and self.reference_text is not None and "kdflow_bpb_reference" not in scored:
            scored.append("kdflow_bpb_reference")  # eval.reference_text: scored whenever benchmarks run
        if "kdflow_bpb_reference" in self.benchmarks.tasks and self.reference_text is None:
            raise ValueError("benchmarks.tasks lists kdflow_bpb_reference but eval.reference_text is null: "
                             "give a reference text or drop the task")
        for key in self.ship.min_retention:
            task = key.split("/", 1)[0]
            if "/" not in key or task not in scored:
                raise ValueError(f"ship.min_retention: {key!r} must be 'task/metric' with the task in "
                                 f"eval.benchmarks.tasks ({scored or 'none listed'})")
        if self.ship.max_on_sample_reverse_kl is not None and self.on_sample_prompts == 0:
            raise ValueError("ship.max_on_sample_reverse_kl needs eval.on_sample_prompts > 0")
        return self


class OrchestrationConfig(_Part):
    """How Prefect runs the DAG."""

    train_deployment: str | None = Field(
        None,
        description="Run training as this deployment (e.g. `kd-train/gpu` on the gpu work pool) via "
        "run_deployment. None: train in-process.",
    )
    cache_deployment: str | None = Field(
        None,
        description="Offline mode: build the teacher cache as this deployment (e.g. `kd-teacher-cache/gpu` on a "
        "big-GPU pool) via run_deployment. None: in-process.",
    )
    refresh_cache: bool = Field(False, description="Ignore cached task results and run every step again.")
    retries: int = Field(2, ge=0, description="Retries of a task after a transient error.")
    retry_delay_s: float = Field(5.0, ge=0, description="Seconds between retries.")
    node_deployment: str = Field(
        "kd-train-node/gpu", description="train.rendezvous.nnodes > 1: the per-node deployment the training step "
        "starts once per node (each runs torchrun for its node against one rendezvous).",
        pattern=r"^[^/]+/[^/]+$",
    )
    gpu_slots: str = Field(
        "gpu-0", description="Global concurrency limit name taken while training, one slot per GPU."
    )
    evidence_signing_key_block: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding an Ed25519 private key (PEM). When the block "
        "exists, the evidence manifest is signed (manifest.sig); check with `kdflow evidence verify RUN "
        "--pubkey PUB.pem`. None: not signed.",
    )


class RunConfig(_Part):
    """A whole distillation: what to distil into what, on which data, how, and where evidence goes."""

    name: str | None = Field(
        None,
        description="Run name (folder under evidence_dir). None: distill-STUDENT-from-TEACHER-YYYYMMDD-HHMMSS (UTC).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    teacher: ModelRef = Field(description="The larger model whose distribution is distilled.")
    student: ModelRef = Field(description="The smaller model being trained.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out text.")
    kd: KDConfig = Field(default_factory=KDConfig, description="Distillation objective.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and gates.")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Prefect execution settings."
    )
    evidence_dir: str = Field("evidence", description="Folder that receives `evidence/RUN/` (one folder per run name).")
    work_dir: str = Field("runs", description="Folder for checkpoints and logs while training (`runs/RUN/`).")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.train.warmup_steps > self.train.steps:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) must be ≤ train.steps ({self.train.steps})"
            )
        if self.train.rendezvous.nnodes > 1 and self.train.distributed == "none":
            raise ValueError(f"train.rendezvous.nnodes={self.train.rendezvous.nnodes} needs train.distributed "
                             "(ddp or fsdp): several nodes train one model with torchrun")
        if self.teacher.init is not None:
            raise ValueError("teacher.init: only the student can be built from the teacher")
        if self.student.server is not None:
            raise ValueError("student.server: only the teacher can be served by an inference engine")
        if self.teacher.server is not None:  # kd/teacher_server/on_policy.py says what is built and why
            if self.kd.teacher_mode != "offline":
                raise ValueError("teacher.server: the served teacher feeds the cache step (kd.teacher_mode: offline) "
                                 "and scores on-policy samples (kd.on_policy.fraction > 0); kd.teacher_mode: online "
                                 "through the engine is not built: set kd.teacher_mode: offline")
            if self.kd.on_policy.seq_kd:
                raise ValueError("kd.on_policy.seq_kd with teacher.server: teacher generation through the engine is "
                                 "not built (the engine scores the student's samples; set kd.on_policy.seq_kd: false)")
            if self.kd.on_policy.fraction > 0 and self.train.distributed != "none":
                raise ValueError(f"train.distributed: {self.train.distributed} with teacher.server and "
                                 "kd.on_policy.fraction > 0: on-policy scoring through the engine runs in the "
                                 "single-process loop only (train.distributed: none)")
        if self.student.init is not None and self.student.init.tokenizer is not None \
                and not self.kd.cross_tokenizer.enabled:
            raise ValueError("student.init.tokenizer: a student with another tokenizer than the teacher's needs "
                             "kd.cross_tokenizer.enabled: true")
        if self.kd.cross_tokenizer.enabled and (self.kd.teacher_mode != "online" or self.kd.on_policy.enabled):
            raise ValueError("kd.cross_tokenizer.enabled: the teacher runs online on prepared batches "
                             "(kd.teacher_mode: online, kd.on_policy off); a cross-tokenizer cache or on-policy "
                             "scoring is not built yet")
        return self


def short_model_name(ref: ModelRef) -> str:
    """`Qwen/Qwen2.5-0.5B` -> `qwen2.5-0.5b`; `tiny:student` -> `tiny-student`; folder -> its name."""
    if ref.init is not None:  # a student pruned from the teacher: name it by its depth
        spec = ref.init.from_teacher
        base = f"pruned-{spec.keep_layers or len(spec.layers or [])}l"
        return base if ref.init.tokenizer is None else f"{base}-{ref.init.tokenizer}"
    base = ref.repo.replace("tiny:", "tiny-").rstrip("/").split("/")[-1].removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()) or "model"


def default_run_name(cfg: RunConfig, when: str) -> str:
    return f"distill-{short_model_name(cfg.student)}-from-{short_model_name(cfg.teacher)}-{when}"


_BOUND_WORDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
                "less_than_equal": ("<=", "le")}


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the dotted field: `kd.temperature: must be > 0, got -1`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] in _BOUND_WORDS:  # Field(gt=0) and friends: `must be > 0`, as the JSON schema says
            op, key = _BOUND_WORDS[e["type"]]
            msg = f"must be {op} {e['ctx'][key]:g}, got {e['input']!r}"
        elif e["type"] == "finite_number":
            msg = f"must be a finite number, got {e['input']!r}"
        elif "input" in e and e["type"] not in ("missing",) and "got" not in msg:
            msg = f"{msg}, got {e['input']!r}"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {format_validation_error(err)}") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `section.field=value` in place; the value is parsed as YAML (`1e-5`, `true`, `null`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.field=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty field name")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML preset (or start empty), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:  # name the spot: a stray Latin-1 byte is easy to miss
            raw = p.read_bytes()
            line = raw[: err.start].count(b"\n") + 1
            raise ConfigError(f"config file {p} is not UTF-8 text: line {line}, byte {err.start} "
                              f"({raw[err.start:err.start + 1]!r}); save it as UTF-8") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
    for o in overrides or []:
        apply_override(data, o)
    return validate_config(data)
