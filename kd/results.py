"""The small results the steps pass to each other (and that the evidence manifest embeds).

Every model here is JSON-serialisable: Prefect persists them for caching, the manifest embeds
them. They carry paths and numbers, never tensors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Result(BaseModel):
    # NaN/inf metrics are evidence (a broken model), not errors: serialise them as the strings
    # "NaN"/"Infinity" so JSON stays standard and round-trips (the default writes null, which
    # then fails validation of a `float` field on reload).
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class PreflightReport(_Result):
    """What preflight found and what the run will do."""

    ok: bool
    python: str
    torch: str
    transformers: str
    huggingface_hub: str
    prefect: str | None = None
    device: str = Field(description="cpu, or the CUDA device name")
    cuda_available: bool
    bf16_supported: bool
    free_disk_bytes: int
    needed_disk_bytes: int = Field(description="Estimated download + checkpoint bytes")
    memory_estimate_bytes: int | None = Field(
        description="Rough peak training memory (weights, grads, Adam, activations); None when sizes are unknown"
    )
    checks: list[dict] = Field(default_factory=list, description="[{name, ok, detail}] per check")
    plan: dict = Field(default_factory=dict, description="Models, sizes, steps, tokens, where things go")


class GGUFSource(_Result):
    """A GGUF model file (llama.cpp format) and the dtype it was dequantized to (kd/gguf.py)."""

    file: str = Field(description="Local path, or hub `repo@commit:file`")
    sha256: str
    file_bytes: int
    architecture: str
    quant_types: dict[str, int] = Field(description="GGUF tensor type (Q4_1, Q8_0, F32...) -> tensor count")
    dtype: str = Field(description="dtype the weights were dequantized to and are run in")
    params: int


class PrunedInit(_Result):
    """A student made from the teacher's embeddings, chosen decoder layers, final norm and head (kd/prune.py)."""

    teacher_content_hash: str
    teacher_layers: int
    layers: list[int] = Field(description="Teacher decoder layers kept, in order")
    strategy: Literal["measured", "block-influence", "even", "given"] = Field(
        "even", description="How the layers were chosen (kd/layer_choice.py); `given`: listed in the config")
    scores: list[dict] = Field(default_factory=list, description=(
        "Per teacher layer, measured on the calibration text: layer, block_influence (1 - mean cos(h_in, h_out)), "
        "drop_loss (calibration loss, nats/token, with only this layer removed), dropped_at (greedy round that "
        "removed it), kept; empty when nothing was measured"))
    calibration: dict | None = Field(None, description="The calibration text: source, blocks, seq_len, tokens, sha256")
    full_loss: float | None = Field(None, description="Calibration loss (nats/token) of the whole teacher")
    kept_loss: float | None = Field(None, description="Calibration loss (nats/token) of the kept layers before training")
    tokenizer: dict | None = Field(None, description="student.init.tokenizer: the tokenizer transplanted onto the "
                                   "pruned student (name, its folder's sha256, vocab, rows kept / composed / unmapped)")


class Provenance(_Result):
    """Which run produced a result: a cached result keeps naming the run that computed it."""

    run_name: str | None = None
    flow_run_id: str | None = None
    task_run_id: str | None = None


class ModelSnapshot(_Result):
    """A model folder on local disk, with where it came from and a hash of every file."""

    role: Literal["teacher", "student"]
    repo: str
    revision: str
    kind: Literal["hub", "local", "tiny", "pruned"]
    resolved_commit: str = Field(description="40-hex hub commit, or `local` for folders and tiny models")
    local_dir: str
    files: dict[str, str] = Field(description="relative path -> sha256")
    total_bytes: int
    gguf: GGUFSource | None = Field(None, description="The GGUF file this folder was converted from, if any")
    init: PrunedInit | None = Field(None, description="How this student was built from the teacher, if it was")
    produced_by: Provenance | None = Field(None, description="The run whose pull made this snapshot (kept when cached)")

    @property
    def content_hash(self) -> str:
        """sha256 over the sorted file hashes: identifies the content wherever it lives."""
        from kd.hashing import digest_of

        return digest_of(self.files)


class VocabAlignment(_Result):
    """How teacher and student vocabularies relate, and what the loss must do about it."""

    verdict: Literal["identical", "teacher-padded", "cross-tokenizer"]
    teacher_rows: int = Field(description="Teacher output-matrix rows (config vocab_size)")
    student_rows: int = Field(description="Student output-matrix rows (config vocab_size)")
    teacher_tokenizer_size: int
    student_tokenizer_size: int
    rows_kept: int = Field(description="Teacher rows used by the loss (= student_rows)")
    valid_vocab: int = Field(
        description="Ids < valid_vocab are real tokens; ids ≥ it are padding rows masked from both softmaxes"
    )
    padding_ids: list[int] = Field(default_factory=list, description="[first, last] padding id range, empty if none")
    dropped_mass_mean: float | None = Field(None, description="Mean teacher probability on the cut rows")
    dropped_mass_max: float | None = None
    special_tokens: dict[str, int | None] = Field(default_factory=dict)
    cross_tokenizer: dict | None = Field(
        None, description="verdict cross-tokenizer: alignment statistics on a sample of the training text "
        "(kd.cross_tokenizer.report: one-to-one group share, mean group sizes, exact-match vocabulary share, teacher "
        "mass on matched ids, texts that do not round-trip)")
    produced_by: Provenance | None = Field(None, description="The run that checked the vocabularies (kept when cached)")

    def identity(self) -> dict:
        """What the alignment is, without who computed it: the part later cache keys depend on."""
        return self.model_dump(exclude={"produced_by"})


class PreparedData(_Result):
    """A prepared (tokenised, packed, split by document) data set on disk; see kd/data/prepared.py."""

    path: str = Field(description="Absolute path of the prepared set's folder (content-addressed)")
    fingerprint: str = Field(description="Content address: source content, tokenizer, data config, code")
    content_hash: str = Field(description="sha256 over the prepared files: the data part of later cache keys")
    format: Literal["text", "chat", "prompt_completion"]
    seq_len: int
    source_files: list[str]
    tokenizer_sha256: str
    counts: dict[str, int] = Field(
        description="records, documents, tokens, target_tokens, blank_lines, skipped, truncated, dropped, "
        "split (overlong documents cut into pieces), per-split blocks/documents/tokens"
    )
    skipped: dict[str, int] = Field(default_factory=dict, description="Skipped bad records by reason")
    length_histogram: dict[str, int] = Field(default_factory=dict, description="Document tokens: `lo-hi` -> count")
    samples: list[str] = Field(default_factory=list, description="Decoded samples; ⟦masked⟧ text carries no loss")
    wall_s: float = Field(0.0, description="Seconds the preparation took (0 when an existing set was reused)")
    tokens_per_s: float = 0.0
    reused: bool = Field(False, description="An identical prepared set already existed and was reused")
    produced_by: Provenance | None = Field(None, description="The run that prepared it (kept when cached)")


class StepLineage(_Result):
    """Where one step's result in the manifest came from (issue 9.11)."""

    cached: bool = Field(description="Reused from Prefect's cache instead of computed by this run")
    produced_by_run: str | None = Field(None, description="Run that computed the result (this run unless cached)")
    flow_run_id: str | None = Field(None, description="Prefect flow run that computed the result")
    rerun_reason: str | None = Field(None, description="Why a cache hit was discarded and the step run again")


class TeacherCacheResult(_Result):
    """The offline teacher's cache (kd/teacher_cache): where it is, what it holds, how this run got it."""

    folder: str = Field(description="Absolute path of the content-addressed cache folder")
    key: str = Field(description="Content address: teacher, tokenizer, prepared data, k, encoding, temperature")
    manifest_sha256: str = Field(description="sha256 of the cache's manifest.json (lists sha256 of every shard)")
    stat: str = Field(description="Size + mtime fingerprint of the shards when this result was made")
    status: Literal["built", "resumed", "repaired", "reused"] = Field(
        description="built from scratch, resumed after a crash, repaired (bad shards rebuilt), or reused as it was")
    built_by_run: str = Field(description="The run that started building this cache")
    top_k: int
    vocab: int = Field(description="Valid vocab ids the top-k are drawn from")
    encoding: dict = Field(description="Encoding and its bytes per token (kd/teacher_cache/encoding.py)")
    cache_temperature: float = Field(description="Stored log-probs are log softmax(teacher logits / this)")
    exactness: dict[str, str] = Field(description="What the sparse loss computes exactly and what approximately")
    tokens: int = Field(description="Tokens (next-token positions) stored, train + held-out")
    shards: int
    shards_built: int = Field(description="Shards this call computed (0 when reused)")
    teacher_forwards: int = Field(description="Teacher forward passes this call ran (0 when reused)")
    bytes: int
    bytes_per_token: float
    build_tokens_per_s: float | None = Field(None, description="Teacher tokens/s of the build (the last one that ran)")
    build_wall_s: float | None = None
    produced_by: Provenance | None = Field(None, description="The run whose cache step made this result")
    source: dict | None = Field(None, description="What computed the top-k when not kdflow's own forward: the inference "
                                "engine, its version, URL, served model, log-prob mode and k (teacher.server)")


class TrainResult(_Result):
    """What training produced."""

    run_dir: str
    checkpoint_dir: str
    checkpoint_sha256: str = Field(description="sha256 over the checkpoint's files")
    metrics_path: str
    log_path: str
    heldout_path: str = Field(description="The prepared set (folder) whose held-out split eval reads "
                              "(older runs: a safetensors file of held-out blocks)")
    steps: int
    resumed_from_step: int = Field(0, description="Step the last attempt started from (0: from scratch)")
    tokens: int = Field(description="Trained tokens: the tokens the loss saw (labels != -100; on-policy batches: "
                        "the generated completion tokens), summed over every step of the run")
    initial_loss: float
    final_loss: float
    tokens_per_s: float = Field(description="Trained tokens per second of this attempt's wall time")
    wall_s: float
    peak_memory_bytes: int
    loss_normalization: str | None = Field(
        None, description="What the step's loss is normalized by (kd/train/loss_normalization.py): 'per-token, global "
        "step' = every trained token of an optimizer step weighs 1 / (trained tokens of the whole step: all "
        "micro-batches, all ranks), for the CE and every KD / on-policy term. None: a run from before issue 31")
    device: str
    dtype: str
    produced_by: Provenance | None = Field(None, description="The run that trained it (kept when cached)")
    teacher_cache: TeacherCacheResult | None = Field(
        None, description="Offline mode (kd.teacher_mode=offline): the teacher cache the student was trained from; "
        "the teacher itself was never loaded")
    on_policy: dict | None = Field(
        None, description="kd.on_policy enabled: its settings, samples and tokens generated, batches by kind "
        "(off_policy / on_policy / seq_kd), generation tokens/s and share of step time (from metrics.jsonl)")


class ModelEval(_Result):
    """Held-out metrics of one model."""

    loss: float
    perplexity: float
    kl_to_teacher: float | None = Field(description="KL(teacher||model) at T=1 over the aligned vocab")
    top1_agreement: float | None = Field(description="Fraction of positions whose argmax equals the teacher's")
    entropy: float = Field(description="Mean output entropy (nats)")
    top_token_share: float = Field(description="Share of positions predicting the single most common argmax")
    tokens: int
    bits_per_byte: float | None = Field(None, description="Cross-tokenizer runs: held-out NLL in bits per UTF-8 byte "
                                        "over the bytes every model is scored on (kd/evaluate/cross_tokenizer.py)")
    group_kl_to_teacher: float | None = Field(None, description="Cross-tokenizer runs, students: mean over byte-aligned "
                                              "groups of the binary KL(teacher||model) of the group's realized text vs "
                                              "anything else (kd/cross_tokenizer/group_eval.py)")
    group_top1_agreement: float | None = Field(None, description="Cross-tokenizer runs, students: share of groups where "
                                               "model and teacher agree whether the realized text is their top choice")
    groups: int | None = Field(None, description="Cross-tokenizer runs, students: groups the two group metrics average over")
    end_of_turn_kl: float | None = Field(None, description="Cross-tokenizer chat runs, students: mean over held-out "
                                         "assistant turn ends of the binary KL(teacher||model) of 'the turn ends here' "
                                         "(each side's own end-of-turn token, kd/cross_tokenizer/group_eval.py)")
    end_of_turn_gap: float | None = Field(None, description="Cross-tokenizer chat runs, students: mean |p_t - p_s| of "
                                          "'the turn ends here' over the same turn ends")
    turn_ends: int | None = Field(None, description="Cross-tokenizer chat runs, students: held-out assistant turn ends "
                                  "the two end-of-turn metrics average over")


class Falsifier(_Result):
    id: str
    claim: str
    observed: str
    verdict: Literal["pass", "fail"]


class SampleGeneration(_Result):
    """One fixed prompt and each model's greedy completion of it (kd/samples.py)."""

    prompt: str
    chat_template: bool = Field(description="The prompt was wrapped in the tokenizer's chat template")
    max_new_tokens: int
    repetition_penalty: float = Field(1.0, description="Greedy decoding's repetition penalty (1.0: plain greedy)")
    completions: dict[str, str] = Field(description="model (teacher, student_before, student_after) -> completion")
    teacher_bits: dict[str, float] = Field(
        default_factory=dict, description="model -> the teacher's bits (−log2 p, summed) on that model's completion "
        "tokens, each given the prompt and the tokens before it (F-SHIP-FLUENCY-001); empty where the teacher reads "
        "another tokenizer")
    source: Literal["fixed", "heldout"] = Field(
        "fixed", description="fixed: an eval.sample_prompts prompt; heldout: a prompt cut from held-out data")


class SampleEval(_Result):
    """One model's completions of held-out prompts, scored by the teacher (kd/evaluate/on_samples.py)."""

    reverse_kl: float = Field(description="Mean per-token KL(model||teacher) at T=1 at each generated position, "
                              "exact over the valid vocabulary")
    teacher_nll: float = Field(description="Mean teacher negative log-likelihood of the generated tokens")
    tokens: int = Field(description="Generated tokens scored (prompts and padding excluded)")
    samples: int
    stopped: int = Field(description="Completions that ended with EOS / end of turn (not the length budget)")


class OnSampleReport(_Result):
    """eval.on_sample_prompts > 0: student-before and student-after on their own samples."""

    before: SampleEval
    after: SampleEval
    prompts: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


class BenchmarkTask(_Result):
    """One lm-eval task as it was run (kd/evaluate/benchmarks.py)."""

    task: str
    n_docs: int = Field(description="Documents scored (after the limit)")
    n_available: int = Field(description="Documents the task has")
    limit: int | None = Field(description="Per-task document limit (None: all)")
    version: str = Field(description="The task's own version (its YAML metadata)")
    definition_sha256: str = Field(description="sha256 of the task's full config as lm-eval ran it")
    bundled: bool = Field(description="A kdflow bundled task (kd/evaluate/bundled_tasks.py)")


class BenchmarkDifference(_Result):
    """KD student − fine-tuning control on one benchmark metric, paired bootstrap interval over documents."""

    documents: int
    kd: float
    control: float
    difference: float = Field(description="kd − control, in the metric's units (its direction is the metric's)")
    low: float
    high: float
    confidence: float
    bootstrap_iters: int


class BenchmarkScore(_Result):
    """One metric of one task for the three models, and the student's retention of the teacher's score."""

    task: str
    metric: str
    higher_is_better: bool
    values: dict[str, float] = Field(description="model (teacher, student_before, student_after) -> value")
    stderr: dict[str, float | None] = Field(
        description="model -> standard error: lm-eval's own, or for bits_per_byte / byte_perplexity / word_perplexity "
        "(lm-eval gives none) kdflow's bootstrap over documents, eval.benchmarks.bootstrap_iters resamples "
        "(None: not computed)")
    retention: float | None = Field(
        description="after ÷ teacher (teacher ÷ after when lower is better): 1 = as good as the teacher")
    kd_minus_control: BenchmarkDifference | None = Field(
        None, description="eval.control: student-after − control with a paired bootstrap interval (None: no control)")


class BenchmarkReport(_Result):
    """lm-eval benchmarks of teacher, student-before and student-after."""

    lm_eval_version: str
    tasks: list[BenchmarkTask]
    scores: list[BenchmarkScore]
    wall_s: dict[str, float] = Field(description="Seconds per model and `total`")
    bundled_dir: str | None = Field(None, description="Folder of the bundled tasks' YAML and data (rerun with lm_eval)")
    max_length: int
    reference_text: str | None = Field(
        None, description="eval.reference_text scored as kdflow_bpb_reference: out-of-domain text the run did not "
        "train on (None: not scored)")
    reference_dir: str | None = Field(None, description="Folder of kdflow_bpb_reference's YAML and data")


class ShipVerdict(_Result):
    """Would someone deploy this student? (kd/evaluate/ship.py) Separate from the pipeline's pass/fail."""

    verdict: Literal["ship", "dont_ship"]
    checks: list[Falsifier] = Field(description="Each ship check, fail-closed: unmeasured fails")
    reasons: list[str] = Field(default_factory=list, description="One line per failed check")


class DocumentScores(_Result):
    """Per-document sums for the control comparison (kd/evaluate/control.py): model 0 = KD student, 1 = control."""

    source: Literal["heldout", "reference"] = Field(description="heldout: the training source's held-out split; "
                                                    "reference: eval.reference_text, not trained on")
    tokens: list[int] = Field(description="Scored tokens per document")
    bytes: list[int] = Field(description="UTF-8 bytes of the scored tokens' text per document")
    nll: list[list[float]] = Field(description="Per model (KD student, control), summed NLL in nats per document")


class PairedDifference(_Result):
    """KD − control on one metric, with a paired bootstrap interval over documents."""

    metric: Literal["bits_per_byte", "loss_per_token"]
    documents: int
    kd: float
    control: float
    difference: float = Field(description="kd − control (lower is better for both metrics: < 0 means KD won)")
    low: float
    high: float
    kd_stderr: float = Field(description="Bootstrap standard error of the KD student's value over documents")
    control_stderr: float


class ControlReport(_Result):
    """eval.control: the same student fine-tuned (α = 1) on the same data, steps, lr and seed, against the KD one."""

    control: ModelEval = Field(description="The control's held-out metrics (same table as the three models)")
    scores: list[DocumentScores]
    differences: dict[str, list[PairedDifference]] = Field(description="source -> KD − control per metric")
    value_source: str = Field(description="The source F-DISTILL-VALUE-001 is decided on")
    bootstrap_samples: int
    confidence: float
    bootstrap_seed: int
    control_run: str | None = Field(None, description="The run that trained the control (a cache hit names an earlier one)")
    control_checkpoint_sha256: str | None = None


class ReferenceRetention(_Result):
    """Bits per byte of teacher and student-after on eval.reference_text, text the run did not train on."""

    documents: int
    bytes: int
    teacher_bits_per_byte: float
    student_bits_per_byte: float
    retention: float = Field(description="teacher ÷ student bits per byte: 1 = as good as the teacher out of domain")


class BaselineEval(_Result):
    """What eval measures of the teacher and student-before: the same for every trial of a sweep (computed once)."""

    teacher: ModelEval
    student_before: ModelEval
    samples: list[SampleGeneration] = Field(default_factory=list)
    benchmarks: BenchmarkReport | None = None
    reference: DocumentScores | None = Field(None, description="The teacher's per-document NLL on eval.reference_text")
    produced_by: Provenance | None = Field(None, description="The run that computed it (kept when cached)")


class EvalReport(_Result):
    teacher: ModelEval
    student_before: ModelEval
    student_after: ModelEval
    vocab_size: int
    gates: list[Falsifier] = Field(default_factory=list)
    cross_tokenizer: bool = Field(False, description="Teacher and student have different tokenizers: the rows are "
                                  "bits per byte on the same bytes; KL and top-1 are not applicable (no shared vocabulary)")
    produced_by: Provenance | None = Field(None, description="The run that evaluated (kept when cached)")
    samples: list[SampleGeneration] = Field(
        default_factory=list, description="Greedy completions of eval.sample_prompts by the three models")
    on_samples: OnSampleReport | None = Field(
        None, description="Student-before / student-after on completions they sample from held-out prompts: "
        "per-token reverse KL to the teacher and the teacher's NLL (eval.on_sample_prompts > 0)")
    benchmarks: BenchmarkReport | None = Field(
        None, description="lm-eval downstream benchmarks (eval.benchmarks), when any were listed")
    control: ControlReport | None = Field(
        None, description="eval.control: the fine-tuning control and KD − control with paired intervals")
    reference: ReferenceRetention | None = Field(
        None, description="Teacher and student-after on eval.reference_text (not trained on): out-of-domain retention")
    ship: ShipVerdict | None = Field(
        None, description="The ship verdict (kd/evaluate/ship.py): whether the student is worth deploying")

    @property
    def passed(self) -> bool:
        return all(g.verdict == "pass" for g in self.gates)
