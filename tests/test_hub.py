"""kd.hub against the loopback hub (tests/hubserver.py): the real huggingface_hub client code runs."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import pytest

import kd.hubclient
from kd.config import ModelRef
from kd.errors import DataError, ModelError, TransientError
from kd.data.sources import pull_dataset
from kd.hub import hash_tree, pull_model, remote_download_bytes, resolve_commit, sha256_file
from kd.hubclient import Source, storage_folder

REPO = "org/tiny"
NEEDED = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="session")
def model_dir(tiny_pair) -> Path:
    """The tiny student folder: a complete small transformers model (~400 KB of safetensors)."""
    return tiny_pair[1]


@pytest.fixture
def published(hub, model_dir) -> str:
    """`org/tiny` published on the loopback hub; returns its commit."""
    return hub.add_repo(REPO, model_dir)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gets(hub, name: str) -> list:
    return [r for r in hub.requests("GET", "/resolve/") if r.path.endswith("/" + name)]


def test_pull_downloads_verifies_and_records_commit(hub, published, model_dir):
    snap = pull_model(ModelRef(repo=REPO), "student")
    assert snap.kind == "hub" and snap.resolved_commit == published and snap.revision == "main"
    assert sorted(snap.files) == NEEDED
    assert snap.files == {name: _sha(model_dir / name) for name in NEEDED}
    assert snap.total_bytes == sum((model_dir / n).stat().st_size for n in NEEDED)
    local = Path(snap.local_dir)
    assert local.name == published and str(local).startswith(storage_folder(Source(REPO, "main"), None))
    assert hash_tree(local) == snap.files  # exactly the needed files, nothing else
    assert len(_gets(hub, "model.safetensors")) == 1


def test_pinned_commit_and_branch(hub, published, model_dir, tmp_path):
    other = tmp_path / "dev"
    shutil.copytree(model_dir, other)
    (other / "generation_config.json").write_text('{"eos_token_id": 0}\n')
    dev = hub.add_repo(REPO, other, branch="dev")
    assert dev != published
    snap = pull_model(ModelRef(repo=REPO, revision="dev"), "student")
    assert snap.resolved_commit == dev and snap.files["generation_config.json"] == _sha(other / "generation_config.json")
    hub.clear_log()
    pinned = pull_model(ModelRef(repo=REPO, revision=published), "student")
    assert pinned.resolved_commit == published
    assert not hub.requests(path_contains="/revision/")  # a commit needs no resolving


def test_second_pull_makes_no_file_request_and_is_fast(hub, published):
    first = pull_model(ModelRef(repo=REPO), "student")
    hub.clear_log()
    t0 = time.perf_counter()
    second = pull_model(ModelRef(repo=REPO), "student")
    elapsed = time.perf_counter() - t0
    assert second == first
    assert hub.file_requests() == []
    assert elapsed < 1.0, elapsed


def test_offline_pull_from_cache(hub, published, monkeypatch):
    from huggingface_hub import constants

    online = pull_model(ModelRef(repo=REPO), "student")
    hub.clear_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = pull_model(ModelRef(repo=REPO), "student")
    assert offline.files == online.files and offline.resolved_commit == published
    assert hub.log == []
    with pytest.raises(ModelError, match="org/other@main: not in the HF cache.*HF_HUB_OFFLINE"):
        pull_model(ModelRef(repo="org/other"), "student")
    assert hub.log == []


def test_offline_detects_a_corrupted_cached_blob(hub, published, monkeypatch):
    from huggingface_hub import constants

    snap = pull_model(ModelRef(repo=REPO), "student")
    blob = Path(snap.local_dir, "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="model.safetensors: sha256"):
        pull_model(ModelRef(repo=REPO), "student")


def test_corrupted_byte_is_detected_and_fetched_again(hub, published, model_dir, caplog):
    hub.corrupt("model.safetensors", times=1)
    with caplog.at_level(logging.WARNING, logger="kdflow.hub"):
        snap = pull_model(ModelRef(repo=REPO), "student")
    assert snap.files["model.safetensors"] == _sha(model_dir / "model.safetensors")
    assert _sha(Path(snap.local_dir, "model.safetensors")) == _sha(model_dir / "model.safetensors")
    assert len(_gets(hub, "model.safetensors")) == 2
    assert "model.safetensors: sha256" in caplog.text


def test_persistent_corruption_fails_and_leaves_no_bad_blob(hub, published, model_dir):
    hub.corrupt("model.safetensors", times=None)
    with pytest.raises(ModelError, match=r"org/tiny@[0-9a-f]{40}: downloaded twice.*model\.safetensors: sha256"):
        pull_model(ModelRef(repo=REPO), "student")
    assert len(_gets(hub, "model.safetensors")) == 2
    blobs = Path(storage_folder(Source(REPO, "main"), None)) / "blobs"
    assert not (blobs / _sha(model_dir / "model.safetensors")).exists()


def test_503_twice_then_success(hub, published):
    hub.fail_first(2, status=503)
    snap = pull_model(ModelRef(repo=REPO), "student")
    assert snap.resolved_commit == published
    assert [r.status for r in hub.requests(path_contains="/revision/")] == [503, 503, 200]


def test_persistent_503_raises_transient_after_bounded_retries(hub, published):
    hub.fail_first(1000, status=503)
    with pytest.raises(TransientError, match="org/tiny@main: listing files failed 4 times, last: HTTP 503"):
        pull_model(ModelRef(repo=REPO), "student")
    assert len(hub.log) == kd.hubclient.RETRY_ATTEMPTS == 4


@pytest.mark.parametrize("rst", [True, False], ids=["reset", "cut-short"])
def test_connection_dropped_mid_file_recovers(hub, published, model_dir, rst):
    hub.reset_mid_file("model.safetensors", times=1, rst=rst)
    snap = pull_model(ModelRef(repo=REPO), "student")
    assert snap.files["model.safetensors"] == _sha(model_dir / "model.safetensors")
    gets = _gets(hub, "model.safetensors")
    assert len(gets) == 2
    # huggingface_hub retries a cut-short body itself (resuming with Range when it has kept bytes);
    # a reset surfaces as a transport error that kd.hub retries.
    assert gets[1].status == (206 if gets[1].range else 200)


def test_slow_response_times_out_and_is_retried(hub, published, monkeypatch):
    monkeypatch.setattr(kd.hubclient, "READ_TIMEOUT_S", 0.3)
    hub.slow(3.0, times=1, match="/revision/")
    t0 = time.perf_counter()
    snap = pull_model(ModelRef(repo=REPO), "student")
    assert time.perf_counter() - t0 < 2.5  # the client gave up on the slow answer, did not wait 3 s
    assert snap.resolved_commit == published
    assert len(hub.requests(path_contains="/revision/")) == 2


def test_missing_repo_fails_at_once(hub, published):
    with pytest.raises(ModelError, match="org/missing: model repository not found"):
        pull_model(ModelRef(repo="org/missing"), "student")
    assert len(hub.log) == 1


def test_bad_revision_fails_at_once(hub, published):
    with pytest.raises(ModelError, match="org/tiny: revision 'nope' not found"):
        pull_model(ModelRef(repo=REPO, revision="nope"), "student")
    assert len(hub.log) == 1


def test_gated_repo_fails_at_once_with_licence_hint(hub, model_dir):
    hub.add_repo("org/gated", model_dir, gated=True)
    with pytest.raises(ModelError, match="org/gated: gated repo. Accept its licence.*set HF_TOKEN"):
        pull_model(ModelRef(repo="org/gated"), "student")
    assert hub.requests("GET", "/resolve/") == []
    keys = [(r.method, r.path) for r in hub.log]
    assert len(keys) == len(set(keys)), "a request was retried"


def test_gated_repo_with_hf_token_never_leaks_it(hub, model_dir, monkeypatch, caplog):
    secret = "hf_kdflowTestSecret0123456789"
    hub.tokens.add(secret)
    hub.add_repo("org/gated", model_dir, gated=True)
    monkeypatch.setenv("HF_TOKEN", secret)
    with caplog.at_level(logging.DEBUG):
        snap = pull_model(ModelRef(repo="org/gated"), "teacher")
    assert sorted(snap.files) == NEEDED
    assert all(r.authorization == f"Bearer {secret}" for r in hub.requests("GET", "/resolve/"))
    assert secret not in snap.model_dump_json()
    assert secret not in caplog.text


def test_pickle_only_repo_refused_before_download(hub):
    hub.add_repo("org/pickle", {"config.json": b'{"vocab_size": 8}', "pytorch_model.bin": b"\x80\x02pickle"})
    with pytest.raises(ModelError, match="org/pickle: only pickle weights \\(pytorch_model.bin\\)"):
        pull_model(ModelRef(repo="org/pickle"), "student")
    assert hub.file_requests() == []


def test_transformers_loads_the_snapshot(hub, published, model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    snap = pull_model(ModelRef(repo=REPO), "student")
    model = AutoModelForCausalLM.from_pretrained(snap.local_dir)
    original = load_file(model_dir / "model.safetensors")
    name = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[name], original[name])


def test_transformers_from_pretrained_talks_to_the_loopback_hub(hub, published, tmp_path):
    """The server is faithful enough for transformers' own hub code path, not only ours."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REPO, revision=published, cache_dir=tmp_path / "tf-cache")
    assert model.config.vocab_size > 0
    assert _gets(hub, "model.safetensors")


def test_remote_download_bytes(hub, published, model_dir, tiny_pair):
    ref = ModelRef(repo=REPO)
    assert remote_download_bytes(ref) == sum((model_dir / n).stat().st_size for n in NEEDED)
    assert hub.file_requests() == []
    pull_model(ref, "student")
    assert remote_download_bytes(ref) == 0  # all cached
    assert remote_download_bytes(ModelRef(repo=str(tiny_pair[0]))) is None
    assert remote_download_bytes(ModelRef(repo="org/missing")) is None
    hub.stop()
    assert remote_download_bytes(ref) is None  # unreachable: logged, not raised


def test_local_folder_is_hashed_and_pickle_only_folder_refused(model_dir, tmp_path):
    snap = pull_model(ModelRef(repo=str(model_dir)), "student")
    assert snap.kind == "local" and snap.resolved_commit == "local"
    assert snap.files == {n: sha256_file(model_dir / n) for n in NEEDED}
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ModelError, match=f"{pickled}: only pickle weights"):
        pull_model(ModelRef(repo=str(pickled)), "student")
    with pytest.raises(ModelError, match="local model folder not found"):
        pull_model(ModelRef(repo=str(tmp_path / "nope")), "student")


def test_tiny_models_come_from_ensure_tiny(tiny_pair):
    snap = pull_model(ModelRef(repo="tiny:teacher"), "teacher")
    assert snap.kind == "tiny" and Path(snap.local_dir) == tiny_pair[0]
    assert snap.files["model.safetensors"] == sha256_file(tiny_pair[0] / "model.safetensors")


def test_error_classification():
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    src = Source(REPO, "main")
    try:
        try:
            raise httpx2.ConnectError("refused")
        except httpx2.ConnectError as cause:
            raise LocalEntryNotFoundError("cannot find the files") from cause
    except LocalEntryNotFoundError as err:
        assert kd.hubclient.classify(err, src, None) == "ConnectError: refused"
    assert isinstance(kd.hubclient.classify(LocalEntryNotFoundError("not cached"), src, None), ModelError)
    assert kd.hubclient.classify(ValueError("a bug"), src, None) is None
    assert "s3cr3t" not in kd.hubclient.classify(httpx2.ReadTimeout("token s3cr3t"), src, "s3cr3t")
    dataset = Source("org/data", "main", "dataset")
    assert isinstance(kd.hubclient.classify(LocalEntryNotFoundError("not cached"), dataset, None), DataError)


def test_resolve_commit_online_pinned_and_offline(hub, published, monkeypatch):
    from huggingface_hub import constants

    assert resolve_commit(ModelRef(repo=REPO)) == published
    assert resolve_commit(ModelRef(repo=REPO, revision=published)) == published
    with pytest.raises(ModelError, match="revision 'nope' not found"):
        resolve_commit(ModelRef(repo=REPO, revision="nope"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not in the HF cache"):
        resolve_commit(ModelRef(repo=REPO))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    pull_model(ModelRef(repo=REPO), "student")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.clear_log()
    assert resolve_commit(ModelRef(repo=REPO)) == published  # from the ref the pull recorded
    assert hub.log == []


def test_pull_dataset_fetches_data_files_verified(hub, monkeypatch):
    from huggingface_hub import constants

    files = {"README.md": b"# corpus\n", "data/train.jsonl": b'{"text": "hello"}\n',
             "data/more.parquet": b"PAR1" + bytes(range(200)) + b"PAR1", "notes.txt": b"plain text\n"}
    commit = hub.add_repo("org/corpus", files, repo_type="dataset")
    folder = Path(pull_dataset("org/corpus"))
    assert folder.name == commit
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == ["data/more.parquet", "data/train.jsonl", "notes.txt"]
    assert all((folder / p).read_bytes() == files[p] for p in got)
    hub.corrupt("more.parquet", times=None)
    hub.add_repo("org/corpus2", files, repo_type="dataset")
    with pytest.raises(DataError, match="data/more.parquet: sha256"):
        pull_dataset("org/corpus2")
    with pytest.raises(DataError, match="org/none: dataset repository not found"):
        pull_dataset("org/none")
    hub.add_repo("org/empty", {"README.md": b"x"}, repo_type="dataset")
    with pytest.raises(DataError, match="no \.txt/\.jsonl/\.parquet/\.arrow files in the repo"):
        pull_dataset("org/empty")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Path(pull_dataset("org/corpus")) == folder
