"""Task `check_vocab`: align the vocabularies; cached on the tokenizer and config hashes."""

from __future__ import annotations

from prefect import task
from tasks import artifacts

from backends import get_backend
from kd.config import RunConfig
from kd.cross_tokenizer.report import alignment_report, load_pair
from kd.data import sample_blocks
from kd.errors import VocabError
from kd.preflight import inspect_model_folder
from kd.results import ModelSnapshot, VocabAlignment
from kd.vocab import align_vocab, measure_dropped_mass
from tasks.policy import content_key, provenance

VOCAB_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json", "vocab.json", "merges.txt")


def _vocab_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    t, s = parameters["teacher"], parameters["student"]
    pick = lambda snap: {f: h for f, h in snap.files.items() if f in VOCAB_FILES}  # noqa: E731
    # the dropped-mass sample reads the teacher's weights and the data: both are part of the key
    cross = cfg.kd.cross_tokenizer
    return content_key("vocab", pick(t), pick(s), t.content_hash, cfg.data.model_dump(), cfg.kd.max_dropped_mass,
                       *((cross.stats_blocks,) if cross.enabled else ()))


@task(name="check_vocab", cache_key_fn=_vocab_key, persist_result=True)
def check_vocab(config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot) -> VocabAlignment:
    for ref, snap in ((config.teacher, teacher), (config.student, student)):
        if ref.kind == "hub" and not ref.is_gguf:  # pulled just now; local folders were checked by preflight
            inspect_model_folder(snap.local_dir, snap.role, ref.trust_remote_code)
    alignment = align_vocab(teacher.local_dir, student.local_dir, cross_tokenizer=config.kd.cross_tokenizer.enabled)
    if alignment.verdict == "cross-tokenizer":
        backend = get_backend("hf")
        model = backend.load(teacher.local_dir, trust_remote_code=config.teacher.trust_remote_code)
        blocks = sample_blocks(config.data, student.local_dir, n_blocks=config.kd.cross_tokenizer.stats_blocks)
        stats = alignment_report(load_pair(teacher.local_dir, student.local_dir), blocks, teacher_model=model)
        alignment = alignment.model_copy(update={"cross_tokenizer": stats})
        artifacts.cross_tokenizer_stats(stats)
    if alignment.verdict == "teacher-padded":
        backend = get_backend("hf")
        model = backend.load(teacher.local_dir, trust_remote_code=config.teacher.trust_remote_code)
        # every teacher id the loss ignores: teacher-only tokens and padding rows alike
        mean, worst = measure_dropped_mass(model, sample_blocks(config.data, student.local_dir), alignment.valid_vocab)
        alignment = alignment.model_copy(update={"dropped_mass_mean": mean, "dropped_mass_max": worst})
        if mean > config.kd.max_dropped_mass:
            raise VocabError(
                f"teacher puts {mean:.3g} mean probability on ids {alignment.valid_vocab}..{alignment.teacher_rows - 1} "
                f"that the student's vocab does not have (kd.max_dropped_mass={config.kd.max_dropped_mass:g}): "
                "those rows carry real signal, the vocabularies do not align"
            )
    artifacts.vocab_alignment(alignment)
    return alignment.model_copy(update={"produced_by": provenance()})  # a cache hit keeps naming this run
