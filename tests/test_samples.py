"""Sample completions (kd/samples.py): decoded as the student will be deployed, the decoding on record."""

from __future__ import annotations

import pytest
import torch

from kd.samples import decoding_of, generate_samples, merge_samples, samples_markdown

A, B = 40, 41  # token ids the rigged model prefers (never in the prompt below)


def _rigged(student_dir):
    """The tiny student with its layers zeroed (each adds nothing to the residual) and every embedding row a
    positive multiple of one vector (tied head): each token's logit is proportional to its row's scale, whatever
    came before. A scores 3, B 2, the rest 0.5: plain greedy repeats A for ever."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        scale = torch.full((model.get_input_embeddings().weight.shape[0], 1), 0.5)
        scale[A], scale[B] = 3.0, 2.0
        model.get_input_embeddings().weight.copy_(scale * torch.ones_like(model.get_input_embeddings().weight[:1]))
    return model


def test_the_repetition_penalty_reaches_every_models_decoding(tiny_pair):
    from transformers import AutoTokenizer

    student_dir = tiny_pair[1]
    model, tok = _rigged(student_dir), AutoTokenizer.from_pretrained(student_dir)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = "the sea"
    assert {A, B}.isdisjoint(tok(prompt)["input_ids"]) and tok.eos_token_id not in (A, B)
    vocab = model.get_input_embeddings().weight.shape[0]

    def run(penalty):
        return generate_samples({"teacher": model, "student_after": model}, student_dir, [prompt], max_new_tokens=6,
                                valid_vocab=vocab, repetition_penalty=penalty)

    plain, penalised = run(1.0), run(2.0)
    assert plain[0].completions["student_after"] == tok.decode([A] * 6, skip_special_tokens=True)
    # A's logit halves once it is in the text (1.5 < B's 2): B once, then B's halves too (1.0 < A's 1.5)
    assert penalised[0].completions["student_after"] == tok.decode([A, B, A, A, A, A], skip_special_tokens=True)
    assert penalised[0].completions["teacher"] == penalised[0].completions["student_after"]  # every model alike
    assert (plain[0].repetition_penalty, penalised[0].repetition_penalty) == (1.0, 2.0)
    assert decoding_of(plain) == "greedy" and decoding_of(penalised) == "greedy, repetition penalty 2"
    assert "greedy, repetition penalty 2" in samples_markdown(penalised)
    with pytest.raises(ValueError, match="decode them differently"):
        merge_samples(plain, penalised)


def test_the_teacher_scores_each_completion_token_given_what_came_before(tiny_pair):
    """The rigged model's next-token distribution is the same after any text, so its bits on a completion are
    the per-token −log2 p of one forward, summed: six A's at plain greedy, A B A A A A under penalty 2."""
    import math

    student_dir = tiny_pair[1]
    model = _rigged(student_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([[7]])).logits[0, -1].float(), -1) / math.log(2)
    for penalty, tokens in [(1.0, [A] * 6), (2.0, [A, B, A, A, A, A])]:
        (s,) = generate_samples({"student_after": model}, student_dir, ["the sea"], max_new_tokens=6, valid_vocab=vocab,
                                repetition_penalty=penalty, scorer=model)
        assert s.teacher_bits["student_after"] == pytest.approx(-float(logp[tokens].sum()), rel=1e-4)
    (unscored,) = generate_samples({"student_after": model}, student_dir, ["the sea"], max_new_tokens=6,
                                   valid_vocab=vocab)
    assert unscored.teacher_bits == {}


def test_held_out_rows_that_start_alike_give_one_prompt(tiny_pair):
    """Chat records rendered as text all start with the same system prompt: three held-out rows that start alike
    were three identical samples (the recipe's first run); they are one prompt, and the next rows fill the count."""
    from types import SimpleNamespace
    from pathlib import Path

    from kd.config import load_config
    from kd.evaluate.step import _samples

    student_dir = tiny_pair[1]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/smoke.yaml")
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "heldout_sample_prompts": 3, "sample_prompts": [], "sample_max_new_tokens": 2})})
    n = cfg.kd.on_policy.prompt_tokens
    same = list(range(10, 10 + n))
    rows = torch.tensor([same + [1] * 8, same + [2] * 8, list(range(30, 30 + n)) + [3] * 8, same + [4] * 8,
                         list(range(50, 50 + n)) + [5] * 8, list(range(70, 70 + n)) + [6] * 8])
    model = _rigged(student_dir)
    samples = _samples(cfg, {"student_after": model}, student_dir, rows, SimpleNamespace(valid_vocab=A + 8), "cpu")
    prompts = [s.prompt for s in samples if s.source == "heldout"]
    assert len(prompts) == 3 == len(set(prompts))
