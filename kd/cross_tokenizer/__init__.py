"""Cross-tokenizer distillation (issue 30): teacher and student from different tokenizer families.

    vocab_files.py  real tokenizers offline (llama.cpp's vocabulary GGUFs, hash-locked) and SmolLM2's
    token_bytes.py  what bytes each token stands for; each token's UTF-8 byte span in a text
    align.py        byte-aligned groups of teacher and student tokens (TRL GOLD's rule) and their stats
    vocab_map.py    the exact-match vocabulary pairs and the student -> teacher projection (X-Token)
    merge.py        the chain-rule merge of a group's distributions ("observed")
    losses.py       chunked ULD, exact-match hybrid and projection-KL losses, chosen by config; the end-of-turn term
    transplant.py   give a donor model a new tokenizer (tokensurgeon-like embedding init)
    settings.py     CrossTokenizerLoss and the run's `kd.cross_tokenizer` part (torch-free, nested by kd/config.py)
    blocks.py       student token blocks -> document pieces' text -> groups with the teacher's tokens
    chat.py         chat data: each side renders a conversation in its own template; groups on the contents only,
                    and each assistant turn's end (its end-of-turn token on each side)
    stored.py       those groups for every prepared block, stored beside the prepared set (memory-mapped)
    group_eval.py   KL and top-1 agreement restated on groups (binary KL of the realized group text); turn ends
    report.py       check_vocab's alignment statistics on a sample of the training text
    student.py      `student.init.tokenizer`: the pruned student transplanted onto a named tokenizer, built once

Pure core: nothing here imports prefect. Wired in (kd.cross_tokenizer.enabled): check_vocab's verdict
`cross-tokenizer` (kd/vocab.py), the groups stored at prepare time (tasks/prepare.py -> stored.py) and read by
the training objective (kd/train/cross_objective.py) and the eval, the eval's bits per byte, group KL and group
agreement with their gates F-DISTILL-BPB-001 and F-DISTILL-GROUPKL-001 (kd/evaluate/cross_tokenizer.py,
kd/evaluate/gates.py); preset configs/smollm2-135m-cross-tokenizer.yaml; docs/cross-tokenizer.md. Not built: a
cross-tokenizer teacher cache (top-k with byte offsets), on-policy across tokenizers. Chat markup has no
counterpart and is left out, except where an assistant turn ends: a binary KL on "the turn ends here", each side
with its own end-of-turn token (losses.py, `kd.cross_tokenizer.end_of_turn`, default on).
"""
