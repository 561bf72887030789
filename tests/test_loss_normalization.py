"""Issue 31: a token counts the same wherever it lands (kd/train/loss_normalization.py).

One global batch of 4 blocks of chat data (assistant-only mask: 79, 46, 32 and 66 trained tokens) and
one of on-policy completions of uneven lengths, each run through the real training loops in float64 as
1 micro-batch of 4, 2 x 2 with accumulation, 4 x 1, and 2 gloo ranks x (1 x 2 with accumulation)
(train_distributed in two spawned processes): the gradient of the step (read where the loops clip it)
and the logged loss agree to 1e-6. The single-process and the distributed loop end with the same weights
after 3 steps. The old rule (a mean of micro-batch means) fails all of these.
Also: `tokens` / `tokens_per_s` count the tokens the loss saw, and the result records the rule.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
CHATML = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
BASE = [f"data.source={REPO / 'kd/corpus/chat/genesis-chat.jsonl'}", "data.format=chat", "data.train_on=assistant",
        "data.seq_len=192", "data.bad_records=skip", "train.device=cpu", "train.dtype=float32",
        "train.warmup_steps=1", "train.lr=1e-3", "train.checkpoint_every=0", "train.rank_timeout_s=120",
        "kd.alpha=0.3", "kd.temperature=2.0"]
ON_POLICY = ["kd.on_policy.fraction=1", "kd.on_policy.divergence=jsd", "kd.on_policy.max_new_tokens=12"]
SPLITS = {"1x4": (4, 1), "2x2": (2, 2), "4x1": (1, 4)}  # batch_size x grad_accum, one process


# ------------------------------------------------------------------------------------------- harness
def _patch(on_policy: bool) -> dict:
    """float64 models; the step's gradient recorded where both loops clip it; for on-policy batches a
    generator whose completions are a pure function of the prompt (lengths 1..11), and the first trained
    turn of each row as its prompt, so the same global batch generates the same completions however it
    is split (the test is about normalization, not sampling). Returns the recorded gradients."""
    import backends.hf
    import kd.train.objectives as objective
    from kd.train.on_policy.generation import Samples
    from kd.train.on_policy.prompts import row_candidates

    grads: dict = {"steps": []}
    load = backends.hf.HFBackend.load
    backends.hf.HFBackend.load = lambda self, d, **kw: load(self, d, **{**kw, "dtype": torch.float64})
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, *a, **k):
        params = list(params)
        grads["steps"].append([p.grad.detach().clone() for p in params])
        return clip(params, *a, **k)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    if on_policy:
        def prompts(batch, **_):
            ids, labels, pos = batch.ids.numpy(), batch.labels.numpy(), batch.position_ids.numpy()
            out = []
            for r in range(len(ids)):
                _, end = row_candidates(ids[r], labels[r], pos[r], fmt="turns", prompt_tokens=8)[0]
                out.append(ids[r, max(0, end - 24):end].tolist())
            return out

        class Fixed:
            def __init__(self, **kw):
                self.pad_id = kw["pad_id"]

            def generate(self, model, prompts, settings, *, seed, synced=False):
                comps = [[5 + (sum(p) * 7 + 13 * j) % 40 for j in range(1 + (sum(p) * 31 + len(p)) % 11)] for p in prompts]
                return Samples([list(p) for p in prompts], comps, self.pad_id, 0.01, [False] * len(prompts))

        objective.prompts_from_batch = prompts
        objective.get_generator = lambda name, **kw: Fixed(**kw)
    return grads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, args: dict) -> None:
    """One gloo rank of train_distributed (world size 2), patched as the single-process runs are."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from kd.config import load_config
    from kd.data import open_prepared
    from kd.train.distributed.loop import train_distributed
    from kd.train.distributed.runtime import process_group
    from kd.vocab import align_vocab

    grads = _patch(args["on_policy"])
    cfg = load_config("configs/smoke.yaml", args["overrides"])
    teacher, student = args["teacher"], args["student"]
    with process_group(timeout_s=120, device_pref="cpu") as env:
        result = train_distributed(cfg, teacher, student, align_vocab(teacher, student),
                                   open_prepared(args["prepared"]), args["run_dir"], env)
    if rank == 0:
        save_file({f"g{i}": g.contiguous() for i, g in enumerate(grads["steps"][0])}, args["run_dir"] + "/grads.safetensors")
        Path(args["run_dir"], "result.json").write_text(result.model_dump_json())


def _distributed(chat, run_dir: Path, overrides: list[str], on_policy: bool) -> dict:
    teacher, student, prepared = chat
    args = {"teacher": str(teacher), "student": str(student), "prepared": str(prepared), "run_dir": str(run_dir),
            "overrides": overrides, "on_policy": on_policy}
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    g = load_file(str(run_dir / "grads.safetensors"))
    return {"grads": [g[f"g{i}"] for i in range(len(g))], "rows": _rows(run_dir),
            "result": json.loads((run_dir / "result.json").read_text()),
            "weights": load_file(str(Path(json.loads((run_dir / "result.json").read_text())["checkpoint_dir"])
                                     / "model.safetensors"))}


def _single(chat, run_dir: Path, overrides: list[str], on_policy: bool) -> dict:
    """train_student in this process with the patches, undone afterwards."""
    import backends.hf
    import kd.train.objectives as objective
    from kd.config import load_config
    from kd.data import open_prepared
    from kd.train.loop import train_student
    from kd.vocab import align_vocab

    saved = (backends.hf.HFBackend.load, torch.nn.utils.clip_grad_norm_, objective.prompts_from_batch,
             objective.get_generator)
    try:
        grads = _patch(on_policy)
        teacher, student, prepared = chat
        cfg = load_config("configs/smoke.yaml", overrides)
        result = train_student(cfg, teacher, student, align_vocab(teacher, student), open_prepared(prepared), run_dir)
    finally:
        (backends.hf.HFBackend.load, torch.nn.utils.clip_grad_norm_, objective.prompts_from_batch,
         objective.get_generator) = saved
    return {"grads": grads["steps"][0], "rows": _rows(run_dir), "result": result.model_dump(mode="json"),
            "weights": load_file(str(Path(result.checkpoint_dir) / "model.safetensors"))}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _runs(chat, tmp: Path, on_policy: bool) -> dict:
    """The same first global batch (4 blocks) four ways; 1x4 and the 2-rank run go on for 3 steps."""
    extra = ON_POLICY if on_policy else []
    runs = {}
    for name, (bs, ga) in SPLITS.items():
        steps = 3 if name == "1x4" else 1
        runs[name] = _single(chat, tmp / name, BASE + extra + [f"train.steps={steps}", f"train.batch_size={bs}",
                                                              f"train.grad_accum={ga}"], on_policy)
    runs["2 ranks x (1x2)"] = _distributed(chat, tmp / "ranks", BASE + extra + [
        "train.steps=3", "train.batch_size=1", "train.grad_accum=2", "train.distributed=ddp"], on_policy)
    return runs


@pytest.fixture(scope="module")
def chat(tiny_pair, tmp_path_factory):
    """(teacher, student, prepared folder): the tiny pair with a ChatML template, the bundled chat corpus
    prepared with the assistant-only mask; the first global batch trains uneven token counts per block."""
    from kd.config import load_config
    from kd.data import open_prepared, prepare_data, train_batch

    tmp = tmp_path_factory.mktemp("chat-norm")
    for name, src in zip(("teacher", "student"), tiny_pair):
        shutil.copytree(src, tmp / name)
        (tmp / name / "chat_template.jinja").write_text(CHATML)
    cfg = load_config("configs/smoke.yaml", BASE + [f"data.prepared_dir={tmp / 'prepared'}"])
    r = prepare_data(cfg.data, tmp / "student")
    first = train_batch(open_prepared(r.path).train, step=0, micro=0, batch_size=4, grad_accum=1, seed=0)
    counts = (first.labels != -100).sum(1).tolist()
    assert len(set(counts)) == 4, counts  # uneven: the old rule would weigh these blocks' tokens differently
    return tmp / "teacher", tmp / "student", Path(r.path)


@pytest.fixture(scope="module")
def chat_runs(chat, tmp_path_factory):
    return _runs(chat, tmp_path_factory.mktemp("chat-runs"), on_policy=False)


@pytest.fixture(scope="module")
def on_policy_runs(chat, tmp_path_factory):
    return _runs(chat, tmp_path_factory.mktemp("on-policy-runs"), on_policy=True)


def _assert_same_step(runs: dict) -> None:
    ref = runs["1x4"]
    for name, run in runs.items():
        assert len(run["grads"]) == len(ref["grads"])
        worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for a, b in zip(run["grads"], ref["grads"]))
        assert worst < 1e-6, f"{name}: gradient differs from 1 x 4 by {worst:.3g} (relative)"
        assert run["rows"][0]["loss"] == pytest.approx(ref["rows"][0]["loss"], rel=1e-9), name
        assert run["rows"][0]["ce"] == pytest.approx(ref["rows"][0]["ce"], rel=1e-9), name
        assert run["rows"][0]["kd"] == pytest.approx(ref["rows"][0]["kd"], rel=1e-9), name


# ------------------------------------------------------------------------------------------- tests
def test_chat_batch_same_gradient_and_loss_however_split(chat_runs):
    _assert_same_step(chat_runs)


def test_on_policy_batch_same_gradient_and_loss_however_split(on_policy_runs):
    rows = [r["rows"][0] for r in on_policy_runs.values()]
    assert all(r["batches_on_policy"] >= 1 and r["batches_off_policy"] == 0 for r in rows)
    assert len({r["gen_tokens"] for r in rows}) == 1  # the same completions in every split
    _assert_same_step(on_policy_runs)


def test_single_process_and_distributed_loops_same_weights_after_3_steps(chat_runs, on_policy_runs):
    for runs in (chat_runs, on_policy_runs):
        one, two = runs["1x4"], runs["2 ranks x (1x2)"]
        assert [r["step"] for r in one["rows"]] == [r["step"] for r in two["rows"]] == [1, 2, 3]
        worst = max(float((one["weights"][k] - two["weights"][k]).abs().max()) for k in one["weights"])
        assert worst < 1e-9, f"weights after 3 steps differ by {worst:.3g}"
        assert [a["loss"] for a in one["rows"]] == pytest.approx([b["loss"] for b in two["rows"]], rel=1e-9)
        assert [a.get("tokens") for a in one["rows"]] == [b.get("tokens") for b in two["rows"]]


def test_tokens_count_what_the_loss_saw(chat, chat_runs, on_policy_runs):
    from kd.data import open_prepared, train_batch

    train = open_prepared(chat[2]).train
    trained = [int((train_batch(train, step=s, micro=0, batch_size=4, grad_accum=1, seed=0).labels != -100).sum())
               for s in range(3)]
    for name, run in on_policy_runs.items():
        # generated batches train their completion tokens only: what was generated, not 4 x 191 per step
        assert run["result"]["tokens"] == run["result"]["on_policy"]["generated_tokens"], name
        assert run["result"]["tokens"] == sum(r["gen_tokens"] for r in run["rows"]) < 4 * 12 * len(run["rows"])
        assert [r["tokens"] for r in run["rows"]] == [r["gen_tokens"] for r in run["rows"]], name
    for name, run in chat_runs.items():
        steps = len(run["rows"])
        assert run["result"]["tokens"] == sum(trained[:steps]) < steps * 4 * 191, name  # not the block length
        assert [r["tokens"] for r in run["rows"]] == trained[:steps], name
    for runs in (chat_runs, on_policy_runs):
        for run in runs.values():
            r = run["result"]
            assert r["loss_normalization"] == "per-token, global step"
            assert 0 < r["tokens_per_s"] <= r["tokens"] / r["wall_s"] * 1.0001
            assert all(row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_s"]) for row in run["rows"])


def test_resumed_run_keeps_counting_tokens(chat, tmp_path):
    """A resume continues the trained-token count from the checkpoint (it is in the trainer state)."""
    from kd.config import load_config
    from kd.data import open_prepared
    from kd.train.loop import train_student
    from kd.vocab import align_vocab

    teacher, student, prepared = chat
    cfg = load_config("configs/smoke.yaml", BASE + ["train.steps=3", "train.batch_size=2", "train.checkpoint_every=1"])
    al, ps = align_vocab(teacher, student), open_prepared(prepared)
    straight = train_student(cfg, teacher, student, al, ps, tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash(row):
        if row["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_student(cfg, teacher, student, al, ps, tmp_path / "resumed", on_step=crash)
    resumed = train_student(cfg, teacher, student, al, ps, tmp_path / "resumed")
    assert resumed.resumed_from_step == 2 and resumed.tokens == straight.tokens == sum(r["tokens"] for r in _rows(
        tmp_path / "straight"))


def test_losses_divide_their_token_sums_by_the_normalizer():
    """normalizer=N: loss, ce, kd and the gradients are the token sums / N, for the online, the sparse and the
    reference loss; two halves with the whole's N add up to the whole call's token mean."""
    from kd.train.losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss, kd_loss_reference, sparse_teacher_targets

    g = torch.Generator().manual_seed(0)
    n, h, v = 12, 8, 20
    hs, w = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    ht, wt = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[[1, 4, 5, 9]] = -100
    m = int((y != -100).sum())
    kw = dict(alpha=0.3, temperature=2.0, divergence="jsd", chunk_size=5)
    t_ids, t_lp, t_tail = sparse_teacher_targets(ht @ wt.t(), k=v, temperature=2.0)

    def run(loss_fn, rows, normalizer=None):
        x = hs.clone().requires_grad_(True)
        if loss_fn == "reference":
            out = kd_loss_reference(x[rows] @ w.t(), ht[rows] @ wt.t(), y[rows], alpha=0.3, temperature=2.0,
                                    divergence="jsd", normalizer=normalizer)
        elif loss_fn == "sparse":
            out = fused_linear_sparse_kd_loss(x[rows], w, t_ids[rows], t_lp[rows], t_tail[rows], y[rows],
                                              cache_temperature=2.0, normalizer=normalizer, **kw)
        else:
            out = fused_linear_kd_loss(x[rows], w, ht[rows], wt, y[rows], normalizer=normalizer, **kw)
        out.loss.backward()
        return out, x.grad

    every, first, second = slice(0, n), slice(0, 7), slice(7, n)
    loss_of = lambda out: float(out.loss.detach())  # noqa: E731
    for fn in ("fused", "sparse", "reference"):
        mean, g_mean = run(fn, every)
        scaled, g_scaled = run(fn, every, normalizer=3 * m)
        assert loss_of(scaled) == pytest.approx(loss_of(mean) / 3, rel=1e-12), fn
        assert float(scaled.ce) == pytest.approx(float(mean.ce) / 3, rel=1e-12), fn
        assert float(scaled.kd) == pytest.approx(float(mean.kd) / 3, rel=1e-12), fn
        torch.testing.assert_close(g_scaled, g_mean / 3, rtol=1e-12, atol=1e-15)
        (a, g_a), (b, g_b) = run(fn, first, normalizer=m), run(fn, second, normalizer=m)
        assert loss_of(a) + loss_of(b) == pytest.approx(loss_of(mean), rel=1e-12), fn
        torch.testing.assert_close(g_a + g_b, g_mean, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        run("fused", every, normalizer=0)
