"""On-policy distillation (issue 17): train the student on completions it samples, scored by the teacher.

    prompts = prompts_from_batch(batch, fmt="chat", prompt_tokens=16, max_prompt_tokens=192, rng=rng)
    gen = get_generator("transformers", stop_ids=stop_ids_of(student_dir), pad_id=eos, valid_vocab=V)
    samples = gen.generate(student, prompts, settings, seed=sample_seed(seed, step, micro, rank))
    batch = samples.batch()          # ids right-padded; labels = the generated tokens only (-100 elsewhere)

Modules: prompts (prompts from prepared data: chat turns, prompt/completion prompts, text prefixes),
generation (the Generator seam, the transformers backend, seeds, valid-vocab masking, batch assembly),
objective (GKD's per-micro-batch on/off-policy draw around kd.train.objectives' fused-linear objective).
"""

from kd.train.on_policy.generation import (GENERATORS, GenerationSettings, Generator, Samples, get_generator,
                                     sample_seed, stop_ids_of)
from kd.train.on_policy.objective import OnPolicyObjective, batch_kind
from kd.train.on_policy.prompts import prompts_from_batch

__all__ = ["GENERATORS", "GenerationSettings", "Generator", "OnPolicyObjective", "Samples", "batch_kind",
           "get_generator", "prompts_from_batch", "sample_seed", "stop_ids_of"]
