"""Sample generations: fixed prompts, greedy completions from teacher, student-before and student-after.

    samples = generate_samples({"teacher": t, "student_before": b, "student_after": a}, tokenizer_dir,
                               cfg.eval.sample_prompts, max_new_tokens=cfg.eval.sample_max_new_tokens,
                               valid_vocab=alignment.valid_vocab)
    write_samples(samples, run_dir)          # samples.json + samples.md
    print(samples_markdown(samples))         # the `sample-generations` artifact

Metrics say how far the student is from the teacher; a few completions side by side say what
that means. Prompts are chat-templated when the tokenizer has a chat template (an instruct
model answers a user turn), else used as raw text. Decoding is greedy (deterministic), with the
repetition penalty the student will be deployed with (`eval.sample_repetition_penalty`, 1.0 = plain greedy)
for every model alike, and every model only picks ids below `valid_vocab`, so each completion decodes with
the student's tokenizer (the teacher's padding rows can never be emitted).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd.results import SampleGeneration

MODEL_ORDER = ("teacher", "student_before", "student_after")
JSON_FILE, MD_FILE = "samples.json", "samples.md"


def _prompt_ids(tokenizer, prompt: str) -> tuple[torch.Tensor, bool]:
    """(1, T) input ids and whether the chat template was used."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]), True
    ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids]), False


class _OnlyValidIds:
    """Logits processor: ids ≥ valid_vocab (padding rows, teacher-only tokens) can never be picked."""

    def __init__(self, valid_vocab: int):
        self.valid_vocab = valid_vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.valid_vocab:] = float("-inf")
        return scores


@torch.no_grad()
def generate_samples(models: dict, tokenizer_dir: str | Path, prompts: list[str], *, max_new_tokens: int,
                     valid_vocab: int, device: str = "cpu", heldout_prompt_ids: list[list[int]] = (),
                     repetition_penalty: float = 1.0, scorer=None) -> list[SampleGeneration]:
    """Greedy completions (with `repetition_penalty`) by every model in `models` ({name: causal LM}) of every
    prompt in `prompts` (text, chat-templated when the tokenizer has a template) and of every `heldout_prompt_ids`
    prompt (token ids cut from held-out data, already in the data's format). With `scorer` (the teacher, same
    tokenizer), each completion's tokens are also scored by it: `teacher_bits`."""
    from transformers import AutoTokenizer

    if max_new_tokens <= 0 or not (prompts or heldout_prompt_ids):
        return []
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    decoding = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    out = []
    for prompt in prompts:
        ids, templated = _prompt_ids(tokenizer, prompt)
        out.append(SampleGeneration(prompt=prompt, chat_template=templated, **decoding,
                                    **_complete(models, tokenizer, ids, valid_vocab, device, scorer, **decoding)))
    for ids in heldout_prompt_ids:
        t = torch.tensor([list(ids)])
        out.append(SampleGeneration(prompt=tokenizer.decode(ids), chat_template=False, **decoding,
                                    **_complete(models, tokenizer, t, valid_vocab, device, scorer, **decoding),
                                    source="heldout"))
    return out


def _complete(models: dict, tokenizer, ids: torch.Tensor, valid_vocab: int, device: str, scorer, *,
              max_new_tokens: int, repetition_penalty: float) -> dict:
    """{"completions": {model: text}, "teacher_bits": {model: bits}} (the latter empty without a scorer)."""
    from transformers import LogitsProcessorList

    eos = tokenizer.eos_token_id
    ids = ids.to(device)
    completions, bits = {}, {}
    for name in [n for n in MODEL_ORDER if n in models] + [n for n in models if n not in MODEL_ORDER]:
        model = models[name]
        was_training = model.training
        model.eval()
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, pad_token_id=eos if eos is not None else 0, repetition_penalty=repetition_penalty,
            logits_processor=LogitsProcessorList([_OnlyValidIds(valid_vocab)]),
            # a model's generation_config may ask for sampling; greedy is what we mean here
            temperature=None, top_p=None, top_k=None,
        )
        model.train(was_training)
        completions[name] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        if scorer is not None:
            bits[name] = _bits(scorer, gen, ids.shape[1], valid_vocab)
    return {"completions": completions, "teacher_bits": bits}


def _bits(scorer, seq: torch.Tensor, start: int, valid_vocab: int) -> float:
    """−log2 p of the tokens seq[0, start:] under `scorer` (its valid rows), each given all tokens before it."""
    import math

    if seq.shape[1] <= start:
        return 0.0
    was_training = scorer.training
    scorer.eval()
    logits = scorer(input_ids=seq[:, :-1], use_cache=False).logits[0, start - 1:, :valid_vocab].float()
    scorer.train(was_training)
    nll = -torch.log_softmax(logits, -1).gather(1, seq[0, start:, None]).sum()
    return float(nll) / math.log(2)


def merge_samples(base: list[SampleGeneration], more: list[SampleGeneration]) -> list[SampleGeneration]:
    """The same prompts completed by two sets of models (the baselines once, then each trained student): one
    list, each prompt's completions side by side."""
    if not base or not more:
        return list(base or more)
    if [(s.prompt, s.source, s.repetition_penalty) for s in base] != [(s.prompt, s.source, s.repetition_penalty)
                                                                        for s in more]:
        raise ValueError("merge_samples: the two lists complete different prompts, or decode them differently")
    return [b.model_copy(update={"completions": {**b.completions, **m.completions},
                                 "teacher_bits": {**b.teacher_bits, **m.teacher_bits}}) for b, m in zip(base, more)]


def decoding_of(samples: list[SampleGeneration]) -> str:
    """How the completions were decoded, in words: 'greedy' or 'greedy, repetition penalty 1.2'."""
    penalties = sorted({s.repetition_penalty for s in samples} - {1.0})
    return "greedy" + "".join(f", repetition penalty {p:g}" for p in penalties)


def _cell(text: str) -> str:
    """One markdown table cell: pipes escaped, newlines shown as ⏎, never empty."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ").strip()
    return text or "*(empty)*"


def samples_markdown(samples: list[SampleGeneration], title: str = "Sample generations") -> str:
    lines = [f"# {title}", "",
             f"Completions ({decoding_of(samples)}: `eval.sample_repetition_penalty`) of fixed prompts "
             "(`eval.sample_prompts`) and of prompts cut from held-out data (`eval.heldout_sample_prompts`) by the "
             "teacher, the student before training and the student after.", ""]
    for i, s in enumerate(samples, 1):
        how = ("held-out prompt, as in the data" if s.source == "heldout" else
               "chat-templated user turn" if s.chat_template else "raw text")
        lines += [f"## Prompt {i} ({how}, ≤ {s.max_new_tokens} new tokens)", "", f"> {_cell(s.prompt)}", "",
                  "| model | completion |", "|---|---|"]
        lines += [f"| {name.replace('_', '-')} | {_cell(text)} |" for name, text in s.completions.items()]
        lines.append("")
    return "\n".join(lines)


def write_samples(samples: list[SampleGeneration], folder: str | Path) -> dict[str, Path]:
    """samples.json and samples.md in `folder`; returns {file name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {JSON_FILE: folder / JSON_FILE, MD_FILE: folder / MD_FILE}
    paths[JSON_FILE].write_text(json.dumps([s.model_dump() for s in samples], indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    paths[MD_FILE].write_text(samples_markdown(samples) + "\n", encoding="utf-8")
    return paths
