"""Issue 30 item 4: a donor model given a new tokenizer (kd/cross_tokenizer/transplant.py): a 2-layer tiny donor
on SmolLM2's tokenizer moved to GPT-2's."""

from __future__ import annotations

import pytest
import torch

from kd.cross_tokenizer.token_bytes import token_bytes
from kd.cross_tokenizer.transplant import transplant_tokenizer
from kd.cross_tokenizer.vocab_files import TEACHER, load_tokenizer
from kd.cross_tokenizer.vocab_map import exact_matches

TEXT = "<|im_start|>user\nTransplant 12345 tokens 😀 中文 café<|im_end|>\n"


def _donor(vocab: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_donor_on_gpt2_tokenizer(tied):
    donor_tok, new_tok = load_tokenizer(TEACHER), load_tokenizer("gpt2")
    model = _donor(len(donor_tok), tied)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    report = transplant_tokenizer(model, donor_tok, new_tok)
    v = len(new_tok)
    assert report.new_vocab == v == model.config.vocab_size and report.donor_vocab == len(donor_tok)
    assert report.kept + report.composed + report.unmapped == v and report.kept > 30_000
    assert model.config.eos_token_id == new_tok.eos_token_id
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == v
    assert (head.data_ptr() == emb.data_ptr()) == tied

    # tokens present in both vocabularies (same bytes) keep their donor rows, input and output
    vmap = exact_matches(token_bytes(donor_tok), token_bytes(new_tok))
    d_ids, n_ids = torch.as_tensor(vmap.teacher_ids), torch.as_tensor(vmap.student_ids)
    assert torch.equal(emb[n_ids], emb0[d_ids]) and torch.equal(head[n_ids], head0[d_ids])
    # a GPT-2 token the donor spells in several pieces is the mean of those pieces' rows
    shared = set(n_ids.tolist())
    only_new = next(i for i in range(v) if i not in shared
                    and len(donor_tok(new_tok.decode([i]), add_special_tokens=False)["input_ids"]) > 1
                    and new_tok.decode([i]).isascii())
    pieces = donor_tok(new_tok.decode([only_new]), add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(emb[only_new], emb0[pieces].mean(0))

    ids = torch.as_tensor(new_tok(TEXT, add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], v) and torch.isfinite(logits).all()
