"""Domain errors. Each message states the numbers involved and what to do about it."""

NO_MODEL_LOADED = "No model is loaded yet; load one in the Model panel first."


class ChatError(Exception):
    """Base class: the message is safe and useful to show to a user as is."""


class InvalidSetting(ChatError, ValueError):
    """A sampling setting is out of range, NaN or of the wrong type."""


class ContextTooLong(ChatError):
    """The prompt plus max_new_tokens cannot fit into the model's context."""


class UnknownBranch(ChatError, ValueError):
    """A quantization branch that the catalogue does not know."""


class NoGPU(ChatError):
    """No usable CUDA GPU, so exllamav2 cannot run."""


class ModelFolderInvalid(ChatError):
    """A folder that is not a loadable StarCoder2 EXL2/FP16 model."""


class DoesNotFit(ChatError):
    """Weights plus cache do not fit into free GPU memory."""


class NotReady(ChatError):
    """No model is loaded (or one is loading) so nothing can be generated yet."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting  # no load under way: waiting alone will not change it


class GraphCaptureFailed(ChatError):
    """Capturing the decode step as CUDA graphs failed at load; eager decoding still works."""


class GenerationFailed(ChatError):
    """The GPU job failed; the engine recovered and the next request can run."""


class DownloadError(ChatError):
    """Fetching a model from the Hugging Face Hub failed."""


class InvalidMessages(ChatError, ValueError):
    """A chat history that the StarCoder2-Instruct template cannot render."""


class TooManyRequests(ChatError):
    """A client sent more requests in the last minute than the rate limit allows."""

    def __init__(self, message: str, *, retry_after_s: int = 60) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(ChatError):
    """Too many replies are waiting for the GPU (all of them, or this client's)."""


class NoListener(ChatError):
    """A reply's stream was never opened, or was closed: nobody would read it."""


class LoadingOff(ChatError):
    """Loading a model from the page is off on this server, or the admin token is wrong."""


class ModelNotFound(DownloadError):
    """The repository or the branch does not exist on the Hub (or is private)."""


class HubAccessDenied(DownloadError):
    """The Hub refused access: a gated or private repository, or a wrong HF_TOKEN."""


class HubUnreachable(DownloadError):
    """The Hub could not be reached or failed, and the cache cannot stand in."""


class ModelNotCached(DownloadError):
    """Offline mode is on and the branch is not (completely) in the Hub cache."""


class DiskFull(DownloadError):
    """Not enough free disk space for the files still to download."""


class CorruptDownload(DownloadError):
    """A downloaded file had the wrong size and was discarded."""
