"""Resolve the model folder: a local directory as given, or one EXL2 branch from the Hub."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils import tqdm as hf_tqdm

from starcoder2.branches import AUTO, BRANCHES, estimate_vram_gb, pick_branch
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

logger = logging.getLogger(__name__)

ARCHITECTURE = "Starcoder2ForCausalLM"
MODEL_TYPE = "starcoder2"
# Only what exllamav2 loads: weights, index, config, tokenizer. No README, no measurement.json.
MODEL_FILE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
]
# Seconds between progress lines in the log (a TTY also gets huggingface_hub's own bars).
LOG_EVERY_S = 5.0


@dataclass(frozen=True)
class DownloadProgress:
    """How far a branch download has come; bytes and files include those already cached."""

    # Sent from the download threads, one at a time and in order; bytes_done never goes down.

    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    bytes_per_s: float


@dataclass(frozen=True)
class _RepoFile:
    """One file of the branch as the Hub lists it."""

    path: str
    size: int
    etag: str | None


@dataclass(frozen=True)
class ModelSource:
    """A checked model folder and where it came from, as the page names it."""

    folder: Path
    branch: str | None  # None for a local folder
    label: str  # "owner/repo @ 6_5" for a Hub branch, the path for a local folder


def resolve_model_dir(
    *,
    model_dir: str | None,
    repo: str,
    branch: str,
    context_tokens: int,
    cache_mode: str,
    free_vram_gb: float | None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
) -> ModelSource:
    """Return a checked model folder: model_dir as is, or repo@branch from the Hub cache."""
    if model_dir:
        folder = check_model_dir(model_dir)
        return ModelSource(folder, None, str(folder))
    name = choose_branch(
        branch, free_vram_gb=free_vram_gb, context_tokens=context_tokens, cache_mode=cache_mode
    )
    folder = check_model_dir(download_branch(repo, name, on_progress=on_progress))
    return ModelSource(folder, name, f"{repo} @ {name}")


def choose_branch(
    branch: str, *, free_vram_gb: float | None, context_tokens: int, cache_mode: str
) -> str:
    """Return the branch to fetch: a catalogue name as is, or the largest that fits for 'auto'."""
    valid = ", ".join(BRANCHES)
    if branch == "main":
        raise UnknownBranch(
            "The repository's main branch holds only measurement.json, not a model; "
            f"choose one of {valid} or {AUTO}."
        )
    if branch != AUTO:
        if branch not in BRANCHES:
            raise UnknownBranch(
                f"Unknown branch {branch!r}; choose one of {valid} or {AUTO} "
                "(bits per weight, e.g. 4_25 is 4.25 bits)."
            )
        return branch
    if free_vram_gb is None:
        raise NoGPU(
            "Branch 'auto' picks a quantization from the free GPU memory, but no CUDA GPU was "
            f"found; choose a branch explicitly ({valid})."
        )
    picked = pick_branch(free_vram_gb, context_tokens, cache_mode)
    if picked is None:
        smallest = next(iter(BRANCHES))
        need = estimate_vram_gb(smallest, context_tokens, cache_mode)
        raise DoesNotFit(
            f"No branch fits into {free_vram_gb:.1f} GB of free GPU memory: the smallest, "
            f"{smallest}, needs about {need:.1f} GB with a {context_tokens:,}-token {cache_mode} "
            "cache; lower the context size, use cache mode q4, or free GPU memory."
        )
    return picked


def download_branch(
    repo: str, branch: str, *, on_progress: Callable[[DownloadProgress], None] | None = None
) -> Path:
    """Download (or reuse from the Hub cache) the model files of repo@branch; return the folder."""
    cache_dir = Path(constants.HF_HUB_CACHE)
    files: list[_RepoFile] | None = None
    try:
        files = _list_model_files(repo, branch)
    except RevisionNotFoundError as error:
        raise _hub_error(error, repo=repo, branch=branch, cache_dir=cache_dir) or error from error
    except (HfHubHTTPError, OfflineModeIsEnabled, *_TRANSPORT_ERRORS) as error:
        # Offline, unreachable, or refused: snapshot_download falls back to the cache like
        # every Hub user expects, and raises the same error if nothing is cached.
        logger.info("Cannot list %s@%s on the Hub (%s); trying the cache.", repo, branch, error)

    cached = 0
    if files is not None:
        if not any(file.path.endswith(".safetensors") for file in files):
            raise ModelFolderInvalid(
                f"Branch {branch} of {repo} has no .safetensors weights, so it is not a model "
                f"branch; choose one of {', '.join(BRANCHES)}."
            )
        cached = sum(file.size for file in files if _blob_cached(cache_dir, repo, file))
        needed = sum(file.size for file in files) - cached
        _check_free_space(needed, where=f"{repo}@{branch}", cache_dir=cache_dir)
        logger.info(
            "Downloading %s@%s into %s: %d files, %s, %s of it already cached.",
            *(repo, branch, cache_dir, len(files), _size(needed + cached), _size(cached)),
        )

    tracker = _ProgressTracker(f"{repo}@{branch}", files, cached, on_progress)
    try:
        folder = snapshot_download(
            repo,
            revision=branch,
            allow_patterns=MODEL_FILE_PATTERNS,
            tqdm_class=tracker.tqdm_class(),
        )
    except Exception as error:  # translated below, or re-raised unchanged
        translated = _hub_error(error, repo=repo, branch=branch, cache_dir=cache_dir, files=files)
        if translated is None:
            raise
        raise translated from error
    tracker.finish(Path(folder))
    logger.info("%s@%s is ready in %s.", repo, branch, folder)
    return Path(folder)


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """Return the folder if it holds a complete StarCoder2 model, else raise ModelFolderInvalid."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderInvalid(
            f"Model folder {folder} does not exist; pass a folder with config.json, "
            "tokenizer.json and .safetensors weights, or leave it empty to download a branch."
        )
    remedy = "Download it again, or point the model folder at a complete StarCoder2 model."
    config_path = folder / "config.json"
    if config_path.is_file():
        _check_config(config_path, remedy)
    problems = [
        f"missing {name}"
        for name in ("config.json", "tokenizer.json")
        if not (folder / name).is_file()
    ]
    problems += _weight_problems(folder)
    if problems:
        raise ModelFolderInvalid(
            f"Model folder {folder} is incomplete: {'; '.join(problems)}. {remedy}"
        )
    return folder


def _check_config(config_path: Path, remedy: str) -> None:
    """Raise ModelFolderInvalid unless config.json describes a StarCoder2 causal LM."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderInvalid(
            f"{config_path} is not readable JSON ({error}). {remedy}"
        ) from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or ARCHITECTURE not in architectures:
        raise ModelFolderInvalid(
            f"{config_path.parent} is not a StarCoder2 model: config.json lists architectures "
            f"{architectures!r} (model_type {model_type!r}), expected [{ARCHITECTURE!r}]. {remedy}"
        )
    if model_type is not None and model_type != MODEL_TYPE:
        raise ModelFolderInvalid(
            f"{config_path.parent} is not a StarCoder2 model: config.json has model_type "
            f"{model_type!r}, expected {MODEL_TYPE!r}. {remedy}"
        )


def _weight_problems(folder: Path) -> list[str]:
    """Missing shards named by the index (or no weights at all), and truncated shards."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{indexes[0].name} has no readable weight_map"]
        problems = [f"missing {shard}" for shard in shards if not (folder / shard).is_file()]
        present = [folder / shard for shard in shards if (folder / shard).is_file()]
    else:
        present = sorted(folder.glob("*.safetensors"))
        problems = [] if present else ["no .safetensors weights"]
    problems += [problem for shard in present if (problem := _safetensors_problem(shard))]
    return problems


def _safetensors_problem(path: Path) -> str | None:
    """Describe a safetensors file whose size disagrees with its own header, else None."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            (header_len,) = struct.unpack("<Q", file.read(8))
            if header_len > size - 8:
                return f"{path.name} is truncated ({size:,} bytes)"
            header = json.loads(file.read(header_len))
        ends = [
            tensor["data_offsets"][1] for key, tensor in header.items() if key != "__metadata__"
        ]
    except (OSError, struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return f"{path.name} is not a readable safetensors file ({error})"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} has {size:,} bytes but its header describes {expected:,}"
    return None


def _list_model_files(repo: str, branch: str) -> list[_RepoFile]:
    """The model files of repo@branch with sizes and cache etags, from one Hub API call."""
    info = HfApi().model_info(
        repo, revision=branch, files_metadata=True, timeout=constants.HF_HUB_ETAG_TIMEOUT
    )
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    wanted = filter_repo_objects(siblings, allow_patterns=MODEL_FILE_PATTERNS)
    files = []
    for name in wanted:
        sibling = siblings[name]
        # The cache names a blob after its LFS sha256, or after the git blob id for small files.
        etag = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        files.append(_RepoFile(path=name, size=size or 0, etag=etag))
    return files


def _blob_cached(cache_dir: Path, repo: str, file: _RepoFile) -> bool:
    """Whether the Hub cache already holds this file's content."""
    if file.etag is None:
        return False
    repo_folder = "models--" + repo.replace("/", "--")
    return (cache_dir / repo_folder / "blobs" / file.etag).is_file()


def _check_free_space(needed: int, *, where: str, cache_dir: Path) -> None:
    """Raise DiskFull before any transfer when the files still to fetch exceed the free space."""
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DiskFull(
            f"Downloading {where} needs {_size(needed)} ({needed:,} bytes) but only "
            f"{_size(free)} ({free:,} bytes) is free in {cache_dir}; free some space or set "
            "HF_HOME to a larger disk."
        )


def _size(size: float) -> str:
    """Bytes as GB with one decimal (small sizes as MB)."""
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


# Network errors of the HTTP client huggingface_hub uses: httpx in 1.x, httpx2 in 2.x.
_TRANSPORT_ERRORS = tuple(
    importlib.import_module(name).TransportError
    for name in ("httpx2", "httpx")
    if importlib.util.find_spec(name) is not None
)
_CONSISTENCY = re.compile(r"should be of size (\d+) but has size (\d+) \((.*)\)")


def _hub_error(
    error: BaseException,
    *,
    repo: str,
    branch: str,
    cache_dir: Path,
    files: list[_RepoFile] | None = None,
) -> Exception | None:
    """A user-facing ChatError for a huggingface_hub or network failure; None if unknown."""
    where = f"{repo}@{branch}"
    token_advice = (
        "check that the token in HF_TOKEN can read it"
        if os.environ.get("HF_TOKEN")
        else "set HF_TOKEN to a token that can read it"
    )
    if isinstance(error, GatedRepoError):
        return HubAccessDenied(
            f"{repo} is gated: accept its terms on {constants.ENDPOINT}/{repo} and set HF_TOKEN "
            f"to a read token of the account that accepted them (HTTP {_status(error)})."
        )
    if isinstance(error, RepositoryNotFoundError):
        return ModelNotFound(
            f"Repository {repo} was not found on {constants.ENDPOINT} (HTTP {_status(error)}); "
            f"check the repo name, or if it is private {token_advice}."
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelNotFound(
            f"Branch {branch} does not exist in {repo}; this repository's quantizations are "
            f"branches such as {', '.join(BRANCHES)}."
        )
    if isinstance(error, HfHubHTTPError) and _status(error) in (401, 403):
        return HubAccessDenied(
            f"The Hub refused {where} (HTTP {_status(error)}); set HF_TOKEN to a valid token "
            "with read access to the repository (or unset a wrong one for a public repo)."
        )
    if isinstance(error, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return _not_cached_error(error, where=where, cache_dir=cache_dir)
    if isinstance(error, HfHubHTTPError):
        return HubUnreachable(
            f"The Hub answered HTTP {_status(error)} while downloading {where}; try again later, "
            "or set HF_HUB_OFFLINE=1 to use a copy that is already cached."
        )
    if isinstance(error, _TRANSPORT_ERRORS):
        return HubUnreachable(
            f"The connection to {constants.ENDPOINT} broke off while downloading {where} "
            f"({type(error).__name__}: {error}). Run again to continue (finished files stay in "
            f"{cache_dir}), or set HF_HUB_OFFLINE=1 to use a copy that is already cached."
        )
    if isinstance(error, OSError) and (match := _CONSISTENCY.search(str(error))):
        expected, actual = int(match[1]), int(match[2])
        name = _file_named_by(match[3], files or [])
        return CorruptDownload(
            f"{name} of {where} arrived with {actual:,} bytes instead of {expected:,}, so it "
            "was discarded; run again to download it afresh."
        )
    if isinstance(error, OSError) and error.errno == 28:  # ENOSPC
        return DiskFull(
            f"The disk ran out of space while downloading {where} into {cache_dir}; free some "
            "space or set HF_HOME to a larger disk."
        )
    return None


def _file_named_by(shown: str, files: list[_RepoFile]) -> str:
    """The repo file behind the (possibly shortened) URL huggingface_hub names in its errors."""
    tail = shown.removeprefix("(…)")
    for file in files:
        if tail.endswith(file.path) or (file.etag and tail and file.etag.endswith(tail)):
            return file.path
    return "A file"


def _not_cached_error(error: BaseException, *, where: str, cache_dir: Path) -> Exception:
    """The cache lacks the branch and the Hub could not be asked: say why and what to do."""
    if constants.HF_HUB_OFFLINE or isinstance(error, OfflineModeIsEnabled):
        return ModelNotCached(
            f"HF_HUB_OFFLINE=1 is set but {where} is not (completely) in the cache at "
            f"{cache_dir}; unset HF_HUB_OFFLINE to download it, or set HF_HOME to the cache "
            "that holds it."
        )
    cause = error.__cause__
    if isinstance(cause, HfHubHTTPError):
        reason = f"the Hub answered HTTP {_status(cause)}"
    elif cause is not None:
        reason = f"{constants.ENDPOINT} is unreachable ({type(cause).__name__})"
    else:
        reason = f"{constants.ENDPOINT} is unreachable"
    return HubUnreachable(
        f"Cannot download {where}: {reason}, and it is not (completely) in the cache at "
        f"{cache_dir}. Check the network or proxy and try again; once the model is cached, "
        "HF_HUB_OFFLINE=1 starts without the network."
    )


def _status(error: HfHubHTTPError) -> int | None:
    """The HTTP status of a Hub error, if it carries a response."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


class _ProgressTracker:
    """Sums the byte and file updates of snapshot_download's progress bars into DownloadProgress."""

    def __init__(
        self,
        where: str,
        files: list[_RepoFile] | None,
        bytes_cached: int,
        on_progress: Callable[[DownloadProgress], None] | None,
    ) -> None:
        self._where, self._on_progress = where, on_progress
        self._lock = threading.Lock()
        self._files_total = len(files or [])
        self._bytes_total = sum(file.size for file in files or [])
        self._bytes_cached = self._bytes_done = bytes_cached
        self._bytes_received = 0  # may dip when a server ignores a Range and a file restarts
        self._files_done = 0
        self._started = self._logged = time.monotonic()

    def tqdm_class(self) -> type:
        """A huggingface_hub tqdm that still draws its bar and also reports here."""
        tracker = self

        class _ReportingTqdm(hf_tqdm):
            def __init__(self, *args: object, **kwargs: object) -> None:
                # snapshot_download makes byte bars (unit "B"; in 2.x also a network-transfer
                # bar, which would count twice) and one file-count bar for its thread pool.
                name, desc = str(kwargs.get("name") or ""), str(kwargs.get("desc") or "")
                if kwargs.get("unit") != "B":
                    self._role = "files"
                elif name.endswith(".transfer") or desc.startswith("Downloading bytes"):
                    self._role = "transfer"
                else:
                    self._role = "bytes"
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                if self._role != "transfer":
                    tracker._add(self._role, int(n or 0))
                return super().update(n)

        return _ReportingTqdm

    def _add(self, role: str, count: int) -> None:
        """Count new bytes or finished files and report the totals, which never go down."""
        with self._lock:
            if role == "bytes":
                self._bytes_received += count
                done = self._bytes_cached + self._bytes_received
                if self._bytes_total:
                    done = min(done, self._bytes_total)
                self._bytes_done = max(self._bytes_done, done)
            else:
                self._files_done = min(self._files_done + count, self._files_total)
            self._emit()

    def finish(self, folder: Path) -> None:
        """Report the completed download (also when everything came from the cache)."""
        with self._lock:
            if not self._files_total:  # offline: nothing was listed, so count what the cache has
                present = [path for path in folder.iterdir() if path.is_file()]
                self._files_total = len(present)
                self._bytes_total = sum(path.stat().st_size for path in present)
                self._bytes_cached = self._bytes_total
            self._bytes_done, self._files_done = self._bytes_total, self._files_total
            self._emit(final=True)

    def _emit(self, final: bool = False) -> None:
        """Hand progress to the callback (in order, as the lock is held) and now and then log it."""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        progress = DownloadProgress(
            bytes_done=self._bytes_done,
            bytes_total=max(self._bytes_total, self._bytes_done),
            files_done=self._files_done,
            files_total=max(self._files_total, self._files_done),
            bytes_per_s=max(self._bytes_done - self._bytes_cached, 0) / elapsed,
        )
        if self._on_progress is not None:
            self._on_progress(progress)
        if final or time.monotonic() - self._logged >= LOG_EVERY_S:
            self._logged = time.monotonic()
            logger.info(
                "%s: %s of %s, %d of %d files, %s/s",
                self._where,
                _size(progress.bytes_done),
                _size(progress.bytes_total),
                progress.files_done,
                progress.files_total,
                _size(progress.bytes_per_s),
            )
