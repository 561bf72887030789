"""On-policy distillation (issue 17): the prompts and the generation the GKD objective trains on.

    prompts = prompts_from_batch(batch, fmt="chat", prompt_tokens=16, max_prompt_tokens=192, rng=rng)
    gen = get_generator("transformers", stop_ids=stop_ids_of(student_dir), pad_id=eos, valid_vocab=V)
    samples = gen.generate(student, prompts, settings, seed=sample_seed(seed, step, micro, rank))
    batch = samples.batch()          # ids right-padded; labels = the generated tokens only (-100 elsewhere)

Modules: prompts (prompts from prepared data: chat turns, prompt/completion prompts, text prefixes),
generation (the Generator seam, the transformers backend, seeds, valid-vocab masking, batch assembly).
The per-micro-batch on/off-policy draw itself is kd.train.objectives.OnPolicyObjective.
"""

from kd.train.on_policy.generation import (GENERATORS, GenerationSettings, Generator, Samples, get_generator,
                                           sample_seed, stop_ids_of)
from kd.train.on_policy.prompts import prompts_from_batch

__all__ = ["GENERATORS", "GenerationSettings", "Generator", "Samples", "get_generator", "prompts_from_batch",
           "sample_seed", "stop_ids_of"]
