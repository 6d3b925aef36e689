"""The local Hub server (tests/hub_server.py) against the REAL huggingface_hub and transformers clients.

Nothing is mocked: every call goes over HTTP to 127.0.0.1. Tests run with HF_HUB_OFFLINE=1 (tests/conftest.py),
so `use_local_hub` must switch this process online for its duration and back afterwards.
"""

import json
import os
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
from hub_server import LocalHub, hub_env, use_local_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


REPO = "user/tiny-llama"


@pytest.fixture
def hub(tmp_path):
    """A running local Hub with this process pointed at it (cache under tmp_path)."""
    with LocalHub() as server, use_local_hub(server, tmp_path / "cache"):
        yield server


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_create_repo_twice(hub):
    url = huggingface_hub.create_repo("user/repo")
    assert url.repo_id == "user/repo" and url.endpoint == hub.endpoint
    # without exist_ok the Hub's 409 surfaces; with it the existing repo's url comes back
    with pytest.raises(HfHubHTTPError) as err:
        huggingface_hub.create_repo("user/repo")
    assert err.value.response.status_code == 409
    assert huggingface_hub.create_repo("user/repo", exist_ok=True).repo_id == "user/repo"
    assert hub.requested("POST", r"^/api/repos/create$") == ["/api/repos/create"] * 3
    assert list(hub.files("user/repo")) == [".gitattributes"]  # the Hub's initial commit


def test_upload_download_snapshot_and_info(hub, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)))
    huggingface_hub.create_repo("user/data")
    info = huggingface_hub.upload_folder(repo_id="user/data", folder_path=folder, commit_message="add files")

    commits = hub.commits("user/data")
    assert len(commits) == 2 and commits[-1].oid == info.oid and commits[-1].title == "add files"
    assert hub.files("user/data")["sub/b.bin"] == bytes(range(256))

    path = huggingface_hub.hf_hub_download("user/data", "sub/b.bin")
    assert open(path, "rb").read() == bytes(range(256))
    snapshot = huggingface_hub.snapshot_download("user/data")
    assert os.path.basename(snapshot) == info.oid  # pinned to the resolved commit sha
    assert open(os.path.join(snapshot, "a.txt")).read() == "alpha"

    model_info = huggingface_hub.model_info("user/data")
    assert model_info.sha == info.oid
    assert sorted(s.rfilename for s in model_info.siblings) == [".gitattributes", "a.txt", "sub/b.bin"]
    tree = huggingface_hub.list_repo_tree("user/data", "sub")
    assert [(f.path, f.size) for f in tree] == [("sub/b.bin", 256)]
    assert huggingface_hub.list_repo_files("user/data") == [".gitattributes", "a.txt", "sub/b.bin"]
    # an old commit stays addressable by sha
    assert huggingface_hub.model_info("user/data", revision=commits[0].oid).sha == commits[0].oid


def test_storage_dir_keeps_blobs_on_disk(tmp_path):
    with LocalHub(tmp_path / "storage") as server, use_local_hub(server, tmp_path / "cache"):
        huggingface_hub.create_repo("user/disk")
        huggingface_hub.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id="user/disk")
        huggingface_hub.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id="user/disk")
        huggingface_hub.delete_file("f.txt", repo_id="user/disk")
        first_upload = server.commits("user/disk")[1].oid
        assert server.files("user/disk", revision=first_upload)["f.txt"] == b"v1"
        assert "f.txt" not in server.files("user/disk")
        path = huggingface_hub.hf_hub_download("user/disk", "f.txt", revision=first_upload)
        assert open(path, "rb").read() == b"v1"
    assert (tmp_path / "storage" / "blobs").is_dir()
    state = json.loads((tmp_path / "storage" / "state.json").read_text())
    assert [c["title"] for c in state["models/user/disk"]["commits"]][-1].startswith("Delete")


def test_error_codes(hub):
    huggingface_hub.create_repo("user/errs")
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download("user/errs", "missing.txt")
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.model_info("user/nope")
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.hf_hub_download("user/errs", ".gitattributes", revision="no-such-branch")


@pytest.mark.slow
def test_push_and_load_in_process_and_subprocess(hub, tmp_path):
    input_ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(seed=0)
    model.push_to_hub(REPO)
    first = hub.commits(REPO)[-1]
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files(REPO))
    assert hub.requested("POST", rf"^/api/models/{REPO}/commit/main$")

    loaded = AutoModelForCausalLM.from_pretrained(REPO).eval()
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))

    # a fresh process configured only through environment variables sees the same repo
    out = tmp_path / "sub_logits.pt"
    torch.save(input_ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({REPO!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(out)!r})
    """)
    env = {**os.environ, **hub_env(hub, tmp_path / "home")}
    seen = len(hub.requests)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(out), logits(model, input_ids))
    assert ("GET", f"/{REPO}/resolve/{first.oid}/model.safetensors") in hub.requests[seen:]  # it used the hub

    # a second push makes a new commit; loading again (same cache) picks up the new weights
    model2 = tiny_llama(seed=1)
    model2.push_to_hub(REPO)
    second = hub.commits(REPO)[-1]
    assert second.oid != first.oid and second.parent == first.oid
    assert hub.files(REPO)["model.safetensors"] != hub.files(REPO, revision=first.oid)["model.safetensors"]
    reloaded = AutoModelForCausalLM.from_pretrained(REPO).eval()
    assert torch.equal(logits(reloaded, input_ids), logits(model2, input_ids))
    old = AutoModelForCausalLM.from_pretrained(REPO, revision=first.oid).eval()
    assert torch.equal(logits(old, input_ids), logits(model, input_ids))


def test_commit_failure_raises(hub):
    hub.fail_commits = True
    with pytest.raises(HfHubHTTPError) as err:
        tiny_llama().push_to_hub(REPO)
    assert err.value.response.status_code == 500
    assert [c.title for c in hub.commits(REPO)] == ["initial commit"]  # repo created, nothing committed


def test_use_local_hub_restores_offline_state(tmp_path):
    before = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, os.environ.get("HF_TOKEN"))
    with LocalHub() as server:
        with use_local_hub(server, tmp_path / "cache"):
            assert constants.ENDPOINT == server.endpoint and not huggingface_hub.is_offline_mode()
        assert (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE,
                os.environ.get("HF_TOKEN")) == before
    env = hub_env(server, tmp_path / "home")
    assert env["HF_HUB_OFFLINE"] == "0" and env["HF_ENDPOINT"] == server.endpoint
    json.dumps(env)  # plain strings only, ready for subprocess
