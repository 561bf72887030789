"""Issue 29, on-policy through the served teacher, fast tier: a fake engine answering from the real tiny
teacher's log-probs (tests/fake_engine.py `logprobs_fn`) scores the student's samples; a few on-policy steps
through it give the same losses as the in-process on-policy objective restricted to the same top-k (1e-5).
Plus the config: what is built is accepted, what is not is refused naming the setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backends import get_backend
from kd.config import load_config
from kd.data import pack_dataset, train_batch
from kd.errors import ConfigError
from kd.teacher_cache.build import teacher_targets
from kd.teacher_cache.step import spec_for
from kd.teacher_server.client import TeacherServerClient
from kd.teacher_server.config import TeacherServerConfig
from kd.teacher_server.on_policy import ServedScores, scoring_k
from kd.train.objectives import OfflineObjective, OnPolicyObjective, on_policy_objective
from kd.train.on_policy import stop_ids_of
from kd.vocab import align_vocab
from tests.fake_engine import FakeEngine

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
OP = ["train.batch_size=2", "kd.on_policy.fraction=1", "kd.on_policy.max_new_tokens=10",
      "kd.on_policy.prompt_tokens=8", "train.device=cpu", "train.dtype=float32"]
SERVED = ["teacher.server.url=http://127.0.0.1:9", "kd.teacher_mode=offline"]


class InProcessTopK:
    """The in-process teacher restricted to its top-k + tail: the same sparse targets the cache step stores."""

    def __init__(self, teacher, spec, rows_kept: int):
        self.teacher, self.spec, self.rows_kept, self.cache_temperature = teacher, spec, rows_kept, 1.0

    def targets(self, ids, position_ids=None):
        return teacher_targets(self.teacher, get_backend("hf"), ids, self.spec, temperature=1.0,
                               rows_kept=self.rows_kept, chunk_size=256, position_ids=position_ids)


@pytest.fixture(scope="module")
def pair(tiny_pair):
    teacher_dir, student_dir = tiny_pair
    al = align_vocab(teacher_dir, student_dir)
    teacher = get_backend("hf").load(teacher_dir).eval().requires_grad_(False)
    return teacher_dir, student_dir, al, teacher


@pytest.mark.parametrize("divergence,top_k", [("reverse_kl", 8), ("forward_kl", 10**6)])
def test_on_policy_steps_through_the_engine_equal_in_process_top_k(pair, divergence, top_k):
    teacher_dir, student_dir, al, teacher = pair
    cfg = load_config(SMOKE, OP + [f"kd.top_k={top_k}", f"kd.on_policy.divergence={divergence}"])
    packed = pack_dataset(cfg.data, student_dir, max_positions=256, min_train_blocks=4)
    spec = spec_for(cfg, al)
    assert (spec.k < al.valid_vocab) == (top_k == 8)  # one case with a tail bucket, one exact (k = V)
    head_w, head_b = get_backend("hf").output_head(teacher)

    def teacher_logprobs(ids):  # the engine serves the teacher's valid vocabulary, float64 log softmax
        with torch.no_grad():
            h = get_backend("hf").hidden_states(teacher, torch.tensor([ids]))[0, :-1]
            logits = h @ head_w[: al.valid_vocab].T + (0 if head_b is None else head_b[: al.valid_vocab])
        return torch.log_softmax(logits.double(), -1).numpy()

    backend = get_backend("hf")
    students = [backend.load(student_dir), backend.load(student_dir)]
    stops = stop_ids_of(student_dir)
    server = TeacherServerConfig(url="http://127.0.0.1:9", max_logprobs=-1, retry_backoff_s=0.0, concurrency=2)
    with FakeEngine(vocab=al.valid_vocab, max_logprobs=-1, logprobs_fn=teacher_logprobs) as eng, \
            TeacherServerClient(eng.url, server) as client:
        k = scoring_k(spec.k, spec.vocab, cfg.kd.on_policy.loss_temperature)
        scorer = ServedScores(client, spec, temperature=1.0, k=k)
        served = on_policy_objective(cfg, None, students[0], None, al, packed, student_dir, autocast=False,
                                     device="cpu", scorer=scorer)
        ref_reader = InProcessTopK(teacher, spec, al.rows_kept)
        local = OnPolicyObjective(cfg, None, lambda c: OfflineObjective(c, students[1], ref_reader, al, False, "cpu"),
                                  students[1], teacher, al, fmt="text", stop_ids=stops, pad_id=min(stops),
                                  autocast=False)
        opts = [torch.optim.AdamW(s.parameters(), lr=1e-3) for s in students]
        losses = []
        for step in range(3):
            batch = train_batch(packed.train, step=step, micro=0, batch_size=2, grad_accum=1, seed=cfg.train.seed)
            row = []
            for obj, opt in zip((served, local), opts):
                obj.at(step, 0)
                opt.zero_grad()
                out = obj(batch)
                out.loss.backward()
                opt.step()
                row.append((float(out.loss.detach()), out.tokens, obj.last_samples.completions))
            losses.append(row)
        assert eng.completion_prompts == sum(len(r[0][2]) for r in losses) > 0  # every sample scored by the engine
    for (a, ta, ca), (b, tb, cb) in losses:
        assert ca == cb and ta == tb > 0  # the same samples
        assert np.isfinite(a) and abs(a - b) < 1e-5, (a, b)
    assert len({round(r[0][0], 6) for r in losses}) > 1  # not one number three times
    print(f"{divergence} k={spec.k}: losses {[r[0][0] for r in losses]}, max |d| "
          f"{max(abs(r[0][0] - r[1][0]) for r in losses):.2e}")
    info = scorer.describe()
    assert info["exact"] == (top_k != 8) and info["scored"]["sequences"] == 6


def test_config_accepts_offline_plus_on_policy_through_the_engine_and_refuses_the_rest():
    from kd.preflight import check_on_policy

    cfg = load_config(SMOKE, SERVED + ["kd.on_policy.fraction=0.5"])
    assert cfg.kd.on_policy.fraction == 0.5
    assert "scored by the served teacher" in check_on_policy(cfg)
    with pytest.raises(ConfigError, match="kd.teacher_mode: online through the engine is not built"):
        load_config(SMOKE, ["teacher.server.url=http://127.0.0.1:9", "kd.on_policy.fraction=0.5"])
    with pytest.raises(ConfigError, match="kd.on_policy.seq_kd with teacher.server"):
        load_config(SMOKE, SERVED + ["kd.on_policy.seq_kd=true"])
    with pytest.raises(ConfigError, match="train.distributed: ddp with teacher.server"):
        load_config(SMOKE, SERVED + ["kd.on_policy.fraction=0.5", "train.distributed=ddp"])
    with pytest.raises(ConfigError, match="kd.teacher_mode=offline and kd.on_policy.fraction"):
        check_on_policy(load_config(SMOKE, ["kd.teacher_mode=offline", "kd.on_policy.fraction=0.5"]))


def test_loss_temperature_other_than_1_needs_every_id():
    assert scoring_k(64, 49152, 1.0) == 64 and scoring_k(10**6, 49152, 2.0) == 49152
    with pytest.raises(ConfigError, match="kd.on_policy.loss_temperature"):
        scoring_k(64, 49152, 2.0)
