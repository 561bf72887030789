"""Deterministic tiny teacher/student pairs for smoke runs and tests.

    kdflow make-tiny OUT        # writes OUT/teacher and OUT/student, laid out like hub repos

Both are Qwen2 causal LMs with a byte-level BPE tokenizer trained on the bundled smoke corpus.
Like Qwen2.5-7B vs -0.5B, the teacher's vocabulary is the student's plus extra tokens at the
end (default 16) and both output matrices have padding rows past the tokenizer. The teacher is
briefly trained on the corpus so its targets are not noise; the student starts random.
Everything is a function of the seed: the same seed gives byte-identical files on every x86-64
machine. The teacher's pre-training is a few hundred AdamW steps, and CPUs round differently: MKL
picks AVX-512, AVX2 or SSE code paths by CPU, ATen picks its vectorised kernels the same way, and a
last-bit difference grows over the steps into another teacher (CE 0.61 on AVX-512, 0.69 under
AVX2). So the weights are made in a child process pinned to the code paths every x86-64 CPU has:
MKL's conditional numerical reproducibility (MKL_CBWR=COMPATIBLE), ATen's scalar kernels
(ATEN_CPU_CAPABILITY=default), oneDNN off, one thread. tests/test_tiny.py pins their sha256.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kd.build_once import build_once
from kd.model_build_lock import MODEL_BUILD_LOCK

CORPUS = Path(__file__).parent / "corpus" / "smoke.txt"
EOS = "<|endoftext|>"
TINY_FORMAT = 3  # bump when the generated models change, so cached copies are rebuilt
# The child's environment: every knob that lets a library pick a code path by CPU, fixed. Variables that
# choose a path (MKL_ENABLE_INSTRUCTIONS, MKL_DEBUG_CPU_TYPE) are removed, since MKL_CBWR wins only
# where it is honoured; threads are 1 so no reduction is split by core count.
REPRODUCIBLE_ENV = {"MKL_CBWR": "COMPATIBLE,STRICT", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "DEFAULT",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CPU_PATH_CHOOSERS = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR_BRANCH")
STUDENT_VOCAB_TARGET = 360
ROW_MULTIPLE = 32


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _train_tokenizer(corpus: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=STUDENT_VOCAB_TARGET,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def _save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out)


def _qwen2_config(vocab_rows: int, hidden: int, layers: int, heads: int, tie: bool, eos_id: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _qwen2(cfg, eos_id: int, seed: int):
    from transformers import GenerationConfig, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with MODEL_BUILD_LOCK:  # its __init__ ties the head: see kd.model_build_lock
        model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return model


def _pretrain(model, ids: torch.Tensor, steps: int, seed: int, seq_len: int = 64, batch: int = 12) -> float:
    """A few hundred CE steps on the corpus so the teacher's distribution carries signal."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = (len(ids) - 1) // seq_len
    blocks = ids[: n_blocks * seq_len].view(n_blocks, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = blocks[torch.randint(0, n_blocks, (batch,), generator=g)]
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def make_tiny(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `out_dir/teacher` and `out_dir/student` (generated in a child process pinned to the code
    paths every x86-64 CPU has, see the module docstring); returns their paths."""
    out = Path(out_dir).resolve()
    env = {k: v for k, v in os.environ.items() if k not in CPU_PATH_CHOOSERS} | REPRODUCIBLE_ENV
    proc = subprocess.run([sys.executable, "-m", "kd.tiny", str(out), "--seed", str(seed)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"generating the tiny pair failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out / "teacher", out / "student"


def _generate(
    out_dir: str | Path, seed: int = 0, extra_teacher_tokens: int = 16, teacher_steps: int = 200,
    student_steps: int = 60,
):
    """The generation itself; run only under REPRODUCIBLE_ENV (`make_tiny` sees to it)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise in a smoke run's output
    out = Path(out_dir)
    corpus = CORPUS.read_text()
    torch.backends.mkldnn.enabled = False  # oneDNN dispatches by CPU too; ONEDNN_MAX_CPU_ISA is the belt
    with _single_thread():
        tok, (teacher_cfg, student_cfg), (teacher_tokens, student_tokens) = _tokenizers_and_configs(
            corpus, extra_teacher_tokens, out)
        eos_id, teacher_rows, student_rows = tok.token_to_id(EOS), teacher_cfg.vocab_size, student_cfg.vocab_size
        student_dir, teacher_dir = out / "student", out / "teacher"
        teacher = _qwen2(teacher_cfg, eos_id=eos_id, seed=seed)
        ids = torch.tensor(
            [i for line in corpus.splitlines() for i in tok.encode(line).ids + [eos_id]], dtype=torch.long
        )
        teacher_loss = _pretrain(teacher, ids, steps=teacher_steps, seed=seed)
        student = _qwen2(student_cfg, eos_id=eos_id, seed=seed + 1)
        student_loss = _pretrain(student, ids, steps=student_steps, seed=seed + 1)
        teacher.save_pretrained(teacher_dir)
        student.save_pretrained(student_dir)
    (out / "tiny.json").write_text(
        json.dumps(
            {"seed": seed, "format": TINY_FORMAT, "teacher_rows": teacher_rows, "student_rows": student_rows,
             "teacher_tokens": teacher_tokens, "student_tokens": student_tokens,
             "teacher_final_ce": round(teacher_loss, 4), "student_final_ce": round(student_loss, 4)},
            indent=2,
        )
        + "\n"
    )
    return teacher_dir, student_dir


def _tokenizers_and_configs(corpus: str, extra_teacher_tokens: int, out: Path | None):
    """The trained tokenizer (student vocab + the teacher's extra tokens), both model configs and both
    tokenizer sizes; tokenizers are saved under `out` when given. No weights: about a second."""
    from tokenizers import AddedToken

    tok = _train_tokenizer(corpus)
    student_tokens = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id(EOS)
    if out is not None:
        _save_tokenizer(tok, out / "student")
    tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(extra_teacher_tokens)])
    teacher_tokens = tok.get_vocab_size(with_added_tokens=True)
    if out is not None:
        _save_tokenizer(tok, out / "teacher")
    student_rows = _round_up(student_tokens, ROW_MULTIPLE)
    teacher_rows = max(_round_up(teacher_tokens, ROW_MULTIPLE), student_rows + extra_teacher_tokens)
    configs = (_qwen2_config(teacher_rows, hidden=128, layers=2, heads=4, tie=False, eos_id=eos_id),
               _qwen2_config(student_rows, hidden=64, layers=2, heads=4, tie=True, eos_id=eos_id))
    return tok, configs, (teacher_tokens, student_tokens)


def tiny_config(role: str) -> dict:
    """config.json of the tiny `role` ("teacher" | "student") before it is generated, so the first
    plan can size it: the same tokenizer training and config as `make_tiny`, without any weights."""
    return _planned_configs()[0 if role == "teacher" else 1]


@functools.lru_cache(maxsize=1)
def _planned_configs() -> tuple[dict, dict]:
    _, configs, _ = _tokenizers_and_configs(CORPUS.read_text(), 16, None)
    return tuple(c.to_dict() for c in configs)


def tiny_dir(root: str | Path | None = None, seed: int = 0) -> Path:
    """Where `ensure_tiny` keeps the pair: `$KDFLOW_HOME/tiny/seed<seed>-v<format>` by default."""
    base = Path(root) if root else Path(os.environ.get("KDFLOW_HOME", "~/.cache/kdflow")).expanduser() / "tiny"
    return base / f"seed{seed}-v{TINY_FORMAT}"


def ensure_tiny(root: str | Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """The cached tiny pair under `root` (default `$KDFLOW_HOME/tiny`), created once, atomically."""
    final = tiny_dir(root, seed)
    build_once(final, "tiny.json", lambda tmp: make_tiny(tmp, seed=seed))  # same seed: identical copies
    return final / "teacher", final / "student"


class _single_thread:
    """Pin torch to one thread while generating, so the weights do not depend on the core count."""

    def __enter__(self):
        self._n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self._n)


if __name__ == "__main__":  # the child `make_tiny` starts: python -m kd.tiny OUT --seed N
    import argparse

    parser = argparse.ArgumentParser(description="generate the tiny pair (use `kdflow make-tiny`)")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    missing = {k: v for k, v in REPRODUCIBLE_ENV.items() if os.environ.get(k) != v}
    if missing:  # the settings must be in place before MKL and ATen load: refuse rather than drift
        sys.exit(f"kd.tiny: run through kd.tiny.make_tiny (not set: {sorted(missing)})")
    _generate(args.out, seed=args.seed)
