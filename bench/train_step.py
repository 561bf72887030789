"""KD training-step benchmark: tokens/s, peak memory and MFU of kdflow's real training step.

    python bench/train_step.py                       # Qwen2.5-1.5B -> 0.5B shapes on CUDA, bf16 autocast
    python bench/train_step.py --pair tiny --device cpu --steps 3   # a quick check that it runs anywhere

Models are randomly initialised from Qwen2.5 configs (no download): the step's cost depends on the
shapes, not the weights. One step = teacher forward (no grad) + student forward/backward through
the chunked fused-linear KD loss + AdamW update, exactly as `kd/train.py` runs it.
MFU counts 6·N_student + 2·N_teacher FLOPs per token (attention FLOPs left out, as is usual)
against `--peak-tflops` (H100/H200 SXM dense bf16: 989). Writes `bench/results/train_step-<date>-<pair>.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd.config import RunConfig  # noqa: E402
from kd.results import VocabAlignment  # noqa: E402
from kd.train import _Objective  # noqa: E402

QWEN = {  # from the published config.json files
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
    "tiny-s": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1024),
    "tiny-t": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, vocab_size=1056),
}
PAIRS = {"1.5b-0.5b": ("1.5b", "0.5b"), "7b-0.5b": ("7b", "0.5b"), "tiny": ("tiny-t", "tiny-s")}


def build(name: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**QWEN[name], max_position_embeddings=32768)
    with torch.device(device):
        return Qwen2ForCausalLM(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="1.5b-0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    t_name, s_name = PAIRS[args.pair]
    teacher = build(t_name, args.device).eval().requires_grad_(False)
    student = build(s_name, args.device).train()
    if cuda:
        student.gradient_checkpointing_enable()  # long sequences: activations dominate otherwise
    v_s = QWEN[s_name]["vocab_size"]
    alignment = VocabAlignment(verdict="teacher-padded" if QWEN[t_name]["vocab_size"] > v_s else "identical",
                               teacher_rows=QWEN[t_name]["vocab_size"], student_rows=v_s,
                               teacher_tokenizer_size=v_s, student_tokenizer_size=v_s, rows_kept=v_s, valid_vocab=v_s)
    cfg = RunConfig.model_validate({"teacher": {"repo": "bench/teacher"}, "student": {"repo": "bench/student"},
                                    "kd": {"chunk_size": args.chunk}, "data": {"seq_len": args.seq}})
    objective = _Objective(cfg, student, teacher, alignment, autocast=cuda, device=args.device.split(":")[0])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator(device="cpu").manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, v_s, (args.batch, args.seq), generator=g)
        out = objective(ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync()
    wall = time.perf_counter() - t0
    tokens = args.batch * (args.seq - 1) * args.steps
    tps = tokens / wall
    n_s, n_t = n_params(student), n_params(teacher)
    flops_per_token = 6 * n_s + 2 * n_t
    row = {
        "date": dt.date.today().isoformat(), "pair": args.pair, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "chunk": args.chunk, "steps": args.steps,
        "student_params": n_s, "teacher_params": n_t, "tokens_per_s": tps, "step_s": wall / args.steps,
        "achieved_tflops": tps * flops_per_token / 1e12,
        "mfu": tps * flops_per_token / (args.peak_tflops * 1e12) if cuda else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss_first_last": [losses[0], losses[-1]],
    }
    print(json.dumps(row, indent=2))
    out = args.out or Path(__file__).parent / "results" / f"train_step-{row['date']}-{args.pair}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
