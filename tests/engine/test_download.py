"""Model folder resolution against a local fake Hub, through the real huggingface_hub client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants, file_download

from engine.hub import (
    MODEL_FILE_PATTERNS,
    DownloadProgress,
    _ProgressTracker,
    check_model_dir,
    download_branch,
    resolve_model_dir,
)
from starcoder2.branches import BRANCHES, estimate_vram_gb, pick_branch
from starcoder2.errors import (
    CorruptDownload,
    DiskFull,
    DoesNotFit,
    HubAccessDenied,
    HubUnreachable,
    ModelFolderInvalid,
    ModelNotCached,
    ModelNotFound,
    NoGPU,
    UnknownBranch,
)
from tests.fakes.fakehub import MODEL_BRANCHES, NOT_MODEL_FILES, REPO, SHARDS, FakeHub, model_files

MODEL_FILES = {name for name in model_files("4_25") if name not in NOT_MODEL_FILES}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running fake Hub that huggingface_hub talks to, with a fresh cache and no token."""
    fake = FakeHub().start()
    monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
    template = fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # Real shards are gigabytes read in 10 MB chunks; read these small ones in several chunks too.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 32 * 1024)
    yield fake
    fake.stop()


@pytest.fixture
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub waits a second before resuming a broken transfer; tests need not."""
    monkeypatch.setattr(file_download, "time", SimpleNamespace(sleep=lambda seconds: None))


def resolve(branch: str, **overrides) -> Path:
    """resolve_model_dir with the defaults the app uses."""
    arguments = dict(
        model_dir=None,
        repo=REPO,
        branch=branch,
        context_tokens=4096,
        cache_mode="fp16",
        free_vram_gb=None,
    )
    return resolve_model_dir(**(arguments | overrides)).folder


def cache_blobs() -> Path:
    """The blobs folder of the fake repo in the Hub cache."""
    return Path(constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "blobs"


def write_model(folder: Path, branch: str = "4_25") -> Path:
    """A complete model folder on disk, as a user might pass with --model-dir."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in model_files(branch).items():
        if name not in NOT_MODEL_FILES:
            (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("branch", MODEL_BRANCHES)
def test_each_branch_downloads_exactly_its_model_files(hub: FakeHub, branch: str) -> None:
    folder = resolve(branch)

    assert {path.name for path in folder.iterdir()} == MODEL_FILES
    served = hub.repos[REPO][branch]
    assert folder.name == served.commit
    for name in MODEL_FILES:
        assert (folder / name).read_bytes() == served.files[name].data, name
    assert hub.transferred_files() <= MODEL_FILES
    touched = " ".join(request.path for request in hub.requests)
    for name in NOT_MODEL_FILES:
        assert name not in touched
    assert hub.repos[REPO]["main"].commit not in touched
    assert "/revision/main" not in touched


def test_branches_get_their_own_weights_side_by_side_in_one_cache(hub: FakeHub) -> None:
    low, high = resolve("4_25"), resolve("6_5")

    assert low != high
    for shard in SHARDS:
        assert (low / shard).read_bytes() != (high / shard).read_bytes()
    assert json.loads((high / "config.json").read_text())["quantization_config"]["bits"] == 6.5


def test_a_second_download_reuses_the_cache_without_transferring_files(hub: FakeHub) -> None:
    first = resolve("4_25")
    hub.requests.clear()

    second = resolve("4_25")

    assert second == first
    assert hub.file_transfers() == []
    assert not [r for r in hub.requests if "/resolve/" in r.path or "/lfs/" in r.path]
    assert {r.path.rsplit("/", 2)[-2] for r in hub.requests} == {"revision"}


def test_offline_mode_serves_a_cached_branch_without_any_request(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = resolve("6_5")
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    events: list[DownloadProgress] = []

    assert resolve("6_5", on_progress=events.append) == first
    assert hub.requests == []
    assert events[-1].bytes_done == events[-1].bytes_total > 0
    assert events[-1].files_done == events[-1].files_total == len(MODEL_FILES)


def test_offline_mode_without_a_cached_copy_says_how_to_get_one(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(ModelNotCached) as error:
        resolve("4_25")

    assert "HF_HUB_OFFLINE=1 is set" in str(error.value)
    assert f"{REPO}@4_25 is not (completely) in the cache" in str(error.value)
    assert "unset HF_HUB_OFFLINE" in str(error.value)
    assert hub.requests == []


def test_a_dropped_connection_resumes_the_file_with_a_range_request(
    hub: FakeHub, no_retry_wait: None
) -> None:
    hub.drop_once.add(SHARDS[0])
    data = hub.repos[REPO]["4_25"].files[SHARDS[0]].data

    folder = resolve("4_25")

    assert (folder / SHARDS[0]).read_bytes() == data
    # Whole chunks written before the drop are kept; the rest is asked for with a Range.
    [resumed] = [int(r.range[6:-1]) for r in hub.file_transfers() if r.range]
    assert 0 < resumed <= len(data) // 2
    assert sum(r.body_bytes for r in hub.file_transfers() if "/lfs/" in r.path) < len(data) * 2


def test_a_transfer_that_keeps_breaking_off_fails_cleanly_and_a_rerun_finishes(
    hub: FakeHub, no_retry_wait: None
) -> None:
    hub.truncate.add(SHARDS[1])

    with pytest.raises(HubUnreachable) as error:
        resolve("4_25")

    message = str(error.value)
    assert f"broke off while downloading {REPO}@4_25" in message
    assert "Run again to continue" in message
    snapshot = cache_blobs().parent / "snapshots" / hub.repos[REPO]["4_25"].commit
    assert not (snapshot / SHARDS[1]).exists()
    assert not [path for path in cache_blobs().iterdir() if path.name.endswith(".incomplete")]

    hub.truncate.clear()
    hub.requests.clear()
    folder = resolve("4_25")
    assert hub.transferred_files() == {SHARDS[1]}
    assert check_model_dir(folder) == folder


def test_a_file_that_arrives_short_is_reported_as_corrupt_and_discarded(hub: FakeHub) -> None:
    hub.short.add(SHARDS[0])
    size = len(hub.repos[REPO]["4_25"].files[SHARDS[0]].data)

    with pytest.raises(CorruptDownload) as error:
        resolve("4_25")

    assert str(error.value) == (
        f"{SHARDS[0]} of {REPO}@4_25 arrived with {size - size // 4:,} bytes instead of "
        f"{size:,}, so it was discarded; run again to download it afresh."
    )
    assert not [path for path in cache_blobs().iterdir() if path.stat().st_size == size - size // 4]


def test_a_branch_the_repo_lacks_is_reported_as_not_found(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFound) as error:
        resolve("8_0")

    assert str(error.value).startswith(f"Branch 8_0 does not exist in {REPO};")
    assert hub.file_transfers() == []


def test_an_unknown_repo_is_reported_as_not_found(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFound) as error:
        resolve("4_25", repo="bartowski/no-such-model")

    assert "Repository bartowski/no-such-model was not found" in str(error.value)
    assert "HTTP 404" in str(error.value)


def test_a_private_repo_asks_for_hf_token(hub: FakeHub) -> None:
    hub.status_fault = "private"

    with pytest.raises(ModelNotFound) as error:
        resolve("4_25")

    assert "HTTP 401" in str(error.value)
    assert "if it is private set HF_TOKEN to a token that can read it." in str(error.value)


def test_a_rejected_token_is_reported_with_the_http_status_and_hf_token(hub: FakeHub) -> None:
    hub.status_fault = "unauthorized"

    with pytest.raises(HubAccessDenied) as error:
        resolve("4_25")

    assert str(error.value).startswith(f"The Hub refused {REPO}@4_25 (HTTP 401); set HF_TOKEN")


def test_a_gated_repo_explains_how_to_get_access(hub: FakeHub) -> None:
    hub.status_fault = "gated"

    with pytest.raises(HubAccessDenied) as error:
        resolve("4_25")

    message = str(error.value)
    assert message.startswith(f"{REPO} is gated: accept its terms on {hub.endpoint}/{REPO}")
    assert "set HF_TOKEN to a read token of the account that accepted them (HTTP 403)" in message


def test_a_gated_repo_downloads_with_the_token_from_hf_token(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.status_fault, hub.token = "gated", "hf_accepted"
    monkeypatch.setenv("HF_TOKEN", "hf_accepted")

    folder = resolve("4_25")

    assert check_model_dir(folder) == folder
    assert {r.authorization for r in hub.requests if "/api/" in r.path} == {"Bearer hf_accepted"}


def test_a_server_error_without_a_cached_copy_says_to_try_again(hub: FakeHub) -> None:
    hub.status_fault = "server_error"

    with pytest.raises(HubUnreachable) as error:
        resolve("4_25")

    assert str(error.value).startswith(
        f"Cannot download {REPO}@4_25: the Hub answered HTTP 500, and it is not (completely) in "
        "the cache"
    )
    assert "HF_HUB_OFFLINE=1" in str(error.value)


def test_a_server_error_falls_back_to_a_cached_copy(hub: FakeHub) -> None:
    first = resolve("4_25")
    hub.status_fault = "server_error"

    assert resolve("4_25") == first


def test_an_unreachable_hub_names_the_endpoint_and_suggests_offline_mode(hub: FakeHub) -> None:
    hub.stop()

    with pytest.raises(HubUnreachable) as error:
        resolve("4_25")

    message = str(error.value)
    assert f"{hub.endpoint} is unreachable (ConnectError)" in message
    assert "HF_HUB_OFFLINE=1 starts without the network" in message


def test_progress_grows_monotonically_and_ends_exactly_at_the_total(hub: FakeHub) -> None:
    events: list[DownloadProgress] = []
    total = sum(len(hub.repos[REPO]["4_25"].files[name].data) for name in MODEL_FILES)

    resolve("4_25", on_progress=events.append)

    assert len({event.bytes_done for event in events}) > 2  # real intermediate steps
    for before, after in zip(events, events[1:], strict=False):
        assert after.bytes_done >= before.bytes_done
        assert after.files_done >= before.files_done
    assert {event.bytes_total for event in events} == {total}
    assert {event.files_total for event in events} == {len(MODEL_FILES)}
    assert all(event.bytes_done <= total for event in events)
    last = events[-1]
    assert (last.bytes_done, last.files_done) == (total, len(MODEL_FILES))
    assert last.bytes_per_s > 0


def test_progress_counts_written_bytes_once_not_the_network_transfer_bar_too() -> None:
    # huggingface_hub 2.x feeds a second byte bar with network bytes (Xet and plain HTTP alike).
    events: list[DownloadProgress] = []
    tracker = _ProgressTracker("repo@branch", None, 0, events.append)
    bar_class = tracker.tqdm_class()
    written = bar_class(desc="Reconstructing", total=0, unit="B", disable=True)
    transfer = bar_class(desc="Downloading bytes", total=0, unit="B", disable=True)
    files = bar_class(desc="Fetching 2 files", total=2, disable=True)

    transfer.update(700)
    written.update(500)
    transfer.update(300)
    written.update(-100)  # a restarted file rolls its bytes back; reported bytes never drop
    written.update(600)
    files.update(1)

    assert [(e.bytes_done, e.files_done) for e in events] == [
        (500, 0),
        (500, 0),
        (1000, 0),
        (1000, 0),
    ]


def test_not_enough_disk_space_is_reported_before_any_transfer(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    needed = sum(len(hub.repos[REPO]["4_25"].files[name].data) for name in MODEL_FILES)

    with pytest.raises(DiskFull) as error:
        resolve("4_25")

    assert f"needs 0.5 MB ({needed:,} bytes) but only 0.0 MB (1,000 bytes) is free" in str(
        error.value
    )
    assert "set HF_HOME to a larger disk" in str(error.value)
    assert hub.file_transfers() == []


def test_the_main_branch_is_refused_with_the_list_of_branches(hub: FakeHub) -> None:
    with pytest.raises(UnknownBranch) as error:
        resolve("main")

    assert str(error.value) == (
        "The repository's main branch holds only measurement.json, not a model; "
        "choose one of 3_5, 4_25, 5_0, 6_5, 8_0 or auto."
    )
    assert hub.requests == []


def test_an_unknown_branch_name_lists_the_valid_ones(hub: FakeHub) -> None:
    with pytest.raises(UnknownBranch, match="Unknown branch '4_0'; choose one of 3_5, 4_25"):
        resolve("4_0")
    assert hub.requests == []


def test_auto_downloads_the_branch_that_pick_branch_chooses(hub: FakeHub) -> None:
    free = estimate_vram_gb("6_5", 4096) * 1.06 + 0.01
    assert pick_branch(free, 4096) == "6_5"

    folder = resolve("auto", free_vram_gb=free)

    assert folder.name == hub.repos[REPO]["6_5"].commit


def test_auto_without_a_gpu_asks_for_an_explicit_branch(hub: FakeHub) -> None:
    with pytest.raises(NoGPU, match="no CUDA GPU was found; choose a branch explicitly"):
        resolve("auto", free_vram_gb=None)
    assert hub.requests == []


def test_auto_with_too_little_memory_names_the_smallest_need(hub: FakeHub) -> None:
    need = estimate_vram_gb("3_5", 8192, "q4")

    with pytest.raises(DoesNotFit) as error:
        resolve("auto", free_vram_gb=2.0, context_tokens=8192, cache_mode="q4")

    assert str(error.value).startswith(
        f"No branch fits into 2.0 GB of free GPU memory: the smallest, 3_5, needs about "
        f"{need:.1f} GB with a 8,192-token q4 cache;"
    )
    assert hub.requests == []


def test_a_local_model_dir_is_used_as_is_without_the_hub(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "model")

    assert resolve("main", model_dir=str(folder)) == folder


def test_download_patterns_keep_weights_and_tokenizer_but_not_the_rest() -> None:
    assert "*.safetensors" in MODEL_FILE_PATTERNS
    assert {"config.json", "tokenizer.json"} <= set(MODEL_FILE_PATTERNS)
    assert not {"*.json", "*.md", "*"} & set(MODEL_FILE_PATTERNS)
    assert set(BRANCHES) >= set(MODEL_BRANCHES)


def test_check_model_dir_names_the_missing_shard(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "model")
    (folder / SHARDS[1]).unlink()

    with pytest.raises(ModelFolderInvalid) as error:
        check_model_dir(folder)

    assert str(error.value).startswith(
        f"Model folder {folder} is incomplete: missing {SHARDS[1]}. Download it again"
    )


def test_check_model_dir_lists_every_missing_piece(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()

    with pytest.raises(ModelFolderInvalid) as error:
        check_model_dir(folder)

    assert "missing config.json; missing tokenizer.json; no .safetensors weights" in str(
        error.value
    )


def test_check_model_dir_refuses_a_model_of_another_architecture(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "llama")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelFolderInvalid) as error:
        check_model_dir(folder)

    assert str(error.value).startswith(
        f"{folder} is not a StarCoder2 model: config.json lists architectures "
        "['LlamaForCausalLM'] (model_type 'llama'), expected ['Starcoder2ForCausalLM']."
    )


def test_check_model_dir_spots_a_truncated_shard(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "model")
    shard = folder / SHARDS[0]
    full = shard.read_bytes()
    shard.write_bytes(full[:-1000])

    with pytest.raises(ModelFolderInvalid) as error:
        check_model_dir(folder)

    assert (
        f"{SHARDS[0]} has {len(full) - 1000:,} bytes but its header describes {len(full):,}"
        in str(error.value)
    )


def test_check_model_dir_accepts_a_single_output_safetensors_without_index(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "single")
    (folder / "output.safetensors.index.json").unlink()
    (folder / SHARDS[1]).unlink()
    (folder / SHARDS[0]).rename(folder / "output.safetensors")

    assert check_model_dir(str(folder)) == folder


def test_check_model_dir_says_when_the_folder_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderInvalid, match="does not exist"):
        check_model_dir(tmp_path / "nowhere")


def test_download_branch_returns_the_snapshot_folder_of_the_branch_commit(hub: FakeHub) -> None:
    folder = download_branch(REPO, "4_25")

    assert folder.parent.name == "snapshots"
    assert folder.name == hub.repos[REPO]["4_25"].commit
