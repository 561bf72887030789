"""Cross-tokenizer distillation (issue 30): teacher and student from different tokenizer families.

    vocab_files.py  real tokenizers offline (llama.cpp's vocabulary GGUFs, hash-locked) and SmolLM2's
    token_bytes.py  what bytes each token stands for; each token's UTF-8 byte span in a text
    align.py        byte-aligned groups of teacher and student tokens (TRL GOLD's rule) and their stats
    vocab_map.py    the exact-match vocabulary pairs and the student -> teacher projection (X-Token)
    merge.py        the chain-rule merge of a group's distributions ("observed")
    losses.py       chunked ULD, exact-match hybrid and projection-KL losses, chosen by config
    transplant.py   give a donor model a new tokenizer (tokensurgeon-like embedding init)

Pure core: nothing here imports prefect. Not yet wired into the flow (after the kd/train/ restructure).
"""
