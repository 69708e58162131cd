"""Is a Hub id usable from here? Answered in seconds, through huggingface_hub's own HTTP client (so proxies,
endpoints and tokens configured for the Hub apply), instead of after minutes of retries inside a loader."""
from __future__ import annotations

from typing import Literal

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, HFValidationError

from lite_ft.errors import LiteFTError

PROBE_TIMEOUT_S = 5.0  # one metadata request; a reachable Hub answers in well under a second


def require_hub(repo_id: str, what: Literal["model", "dataset"], alternatives: str) -> None:
    """Return when `repo_id` is cached or the Hub answers for it; else LiteFTError naming offline alternatives.

    An HTTP error from the Hub (a private, gated or missing repo) means the Hub is reachable: the loader then
    reports the precise problem with the user's token. Only a failure to reach the Hub at all stops here.
    """
    if what == "model" and isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: transformers finds it without the network
    if constants.HF_HUB_OFFLINE:
        raise LiteFTError(f"{what} {repo_id!r} is a Hub id but HF_HUB_OFFLINE is set and it is not cached; "
                          f"{alternatives}, or use a local path")
    api = HfApi()
    info = api.model_info if what == "model" else api.dataset_info
    try:
        info(repo_id, timeout=PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        return
    except HFValidationError as exc:
        raise LiteFTError(f"{what} {repo_id!r} is not a valid Hub id ({exc}); {alternatives}, or use a local "
                          "path") from None
    except Exception as exc:  # the HTTP client's transport errors (DNS, refused, timeout, proxy) vary by version
        raise LiteFTError(f"{what} {repo_id!r} looks like a Hub id, but {constants.ENDPOINT} cannot be reached "
                          f"({type(exc).__name__}: {exc}) and it is not in the local Hugging Face cache; "
                          f"{alternatives}, or use a local path") from None
