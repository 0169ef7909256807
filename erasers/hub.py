"""Edits on the Hugging Face Hub: `erasure push DIR --repo OWNER/NAME` uploads an edit (what its erasure.json lists,
erasure.json and its model card README.md) to a model repo, and wherever a command takes an edit, `OWNER/NAME` or
`OWNER/NAME@REVISION` of such a repo loads it as its directory would (erasers.inputs' edit types call
`download_edit` when no local path of that spelling exists: a local path always wins).

huggingface_hub does all the talking, so its usual settings apply: the endpoint (HF_ENDPOINT), the token (--token,
HF_TOKEN, `hf auth login`), the cache downloads go to (HF_HOME, HF_HUB_CACHE) and offline mode (HF_HUB_OFFLINE: a
cached edit still loads). Every check of the input comes before the first request, and a refused push uploads
nothing."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from .cards import CARD
from .errors import UsageError, first_line

# OWNER/NAME, then an optional @REVISION (a branch, tag or commit; branches may hold slashes).
_HUB_ID = re.compile(r"(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>\S+))?")
_OTHER_REPO_TYPES = {"datasets": "a dataset", "spaces": "a Space", "kernels": "a kernel", "buckets": "a bucket"}
# compare (like attack and the benchmarks) records its scores on the card, and writes the card of an edit made before
# cards existed (erasers/cards.py).
CARD_REMEDY = ("an edit goes to the Hub with its scores: score it first with `erasure compare --model MODEL --edit "
               "DIR`, which writes them on its card, then push")
TOKEN_REMEDY = "pass --token, set HF_TOKEN or log in with `hf auth login`"


def hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` reads as a model repo's OWNER/NAME[@REVISION], else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    match = _HUB_ID.fullmatch(text)
    if match is None or match["repo"].split("/")[0] in _OTHER_REPO_TYPES:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def other_repo_type(text: str) -> str | None:
    """"a dataset", "a Space"... when `text` names a repo of another type than a model (datasets/OWNER/NAME)."""
    return _OTHER_REPO_TYPES.get(text.split("/")[0]) if text.count("/") >= 2 else None


def download_edit(text: str, what: str, remedy: str) -> Path:
    """The directory, in huggingface_hub's cache, of the edit whose Hub id is `text` (OWNER/NAME[@REVISION]):
    its erasure.json is fetched first, so a repo that is not an edit is refused before the rest downloads. `what`
    and `remedy` word the errors ("edit", "pass the --out directory of `erasure erase` or ...")."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from .edits import METADATA

    repo_id, revision = hub_id(text)
    with _hub_errors(text, what, remedy):
        try:
            hf_hub_download(repo_id, METADATA, revision=revision)
        except RemoteEntryNotFoundError:
            raise UsageError(f"{what} {text} names a repo on the Hub that is not an edit (no {METADATA}); "
                             f"{remedy}") from None
        return Path(snapshot_download(repo_id, revision=revision))


@contextmanager
def _hub_errors(text: str, what: str, remedy: str):
    """What huggingface_hub raises about `text` (a Hub id or --repo), as one UsageError line that says what to do."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors (refused, unreachable, timeout) come through
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{what} {text}"
    try:
        yield
    except GatedRepoError:
        raise UsageError(f"{where} is a gated repo on the Hub; ask for access on its page, then {TOKEN_REMEDY}") \
            from None
    except RepositoryNotFoundError:
        raise UsageError(f"{where} is no directory here, and the Hub has no model repo {text.split('@')[0]} (a "
                         f"private one needs a token: {TOKEN_REMEDY}); {remedy}") from None
    except RevisionNotFoundError:
        repo, _, revision = text.partition("@")
        raise UsageError(f"{where}: the Hub repo {repo} has no revision {revision!r}; pass a branch, tag or commit "
                         "it has, or leave out @REVISION for its main branch") from None
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise UsageError(f"{where}: HF_HUB_OFFLINE is set and no copy is cached; unset HF_HUB_OFFLINE to "
                             "download it") from None
        raise UsageError(f"{where}: the Hub ({constants.ENDPOINT}) cannot be reached and no copy is cached; check "
                         "the network and HF_ENDPOINT") from None
    except OfflineModeIsEnabled:
        raise UsageError(f"{where}: HF_HUB_OFFLINE is set, so nothing goes to the Hub; unset it to push") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "an error"
        if status == 401:
            raise UsageError(f"{where}: the Hub refused the token (401); {TOKEN_REMEDY} with a valid token") from None
        if status == 403:
            raise UsageError(f"{where}: the token may not write there (403); use a token with write access to that "
                             "namespace, or push to your own (--repo NAME)") from None
        raise UsageError(f"{where}: the Hub answered {status} ({first_line(error)}); try again later") from None
    except httpx2.TransportError as error:
        raise UsageError(f"{where}: the Hub cannot be reached ({first_line(error)}); check the network and "
                         "HF_ENDPOINT") from None


# ----------------------------------------------------------------------------------------------------------------
# erasure push

def model_repo_id(text: str) -> str:
    """`text` as the id of a model repo to push to: OWNER/NAME, or NAME in the token's own namespace."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    kind = other_repo_type(text)
    if kind is not None:
        raise UsageError(f"--repo {text} is {kind} repo; an edit goes to a model repo: pass --repo "
                         f"{text.split('/', 1)[1]}")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise UsageError(f"--repo {text!r} is not a Hub repo id; pass OWNER/NAME or NAME (letters, digits, '-', '_' "
                         "and '.', at most 96 each, no '--' or '..')") from None
    return text


def edit_patterns(path: Path) -> list[str]:
    """The files of the edit directory `path` that go to the Hub, as upload_folder's allow_patterns: erasure.json,
    the model card and what erasure.json lists (a diffusion edit's components, a VLM edit's files); anything else
    beside them (compare's output) stays home."""
    from .edits import METADATA, edit_kind, read_edit
    from .files import read_json
    from .inputs import check_input

    what = "edit"
    remedy = "pass the --out directory of `erasure erase` or `erasure vlm erase`"
    check_input(path, what, remedy, want_dir=True)
    kind = edit_kind(path)
    if kind is None:
        raise UsageError(f"{path} is not an edit (no readable {METADATA}); {remedy}")
    if kind == "diffusion":
        names = read_edit(path)["components"]
    else:
        names = read_json(path / METADATA, "re-run the erase that made it").get("files")
        if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n for n in names):
            raise UsageError(f"{path / METADATA}: field 'files' should be a list of file names; the file is corrupt "
                             "or was edited by hand: re-run the erase that made it")
        missing = [name for name in names if not (path / name).exists()]
        if missing:
            raise UsageError(f"edit {path} lists {missing[0]} but lacks it; re-run the erase that made it")
    return [METADATA, CARD] + [f"{name}/*" if (path / name).is_dir() else name for name in names]


def check_card(path: Path) -> None:
    """The model card README.md of the edit at `path` holds results (its YAML model-index, read by huggingface_hub)."""
    import yaml
    from huggingface_hub import ModelCard

    card = path / CARD
    if not card.is_file():
        raise UsageError(f"edit {path} has no model card ({CARD}); {CARD_REMEDY}")
    try:
        results = ModelCard.load(card).data.eval_results
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"the model card {card} does not read ({first_line(error)}); fix its YAML header or write "
                         "it again") from None
    if not results:
        raise UsageError(f"the model card {card} has no results (its model-index is missing or empty); "
                         f"{CARD_REMEDY}")


def push_edit(directory: str | Path, repo: str, token: str | None = None, private: bool = False,
              revision: str | None = None, commit_message: str | None = None):
    """Upload the edit at `directory` to the model repo `repo` (created if new; `private` then), on the branch
    `revision` (created from main if new) or main. Returns (repo id, huggingface_hub's CommitInfo)."""
    from huggingface_hub import HfApi, get_token

    path = Path(directory)
    patterns = edit_patterns(path)
    check_card(path)
    repo_id = model_repo_id(repo)
    token = token or get_token()
    if not token:
        raise UsageError(f"pushing needs a Hugging Face token with write access: {TOKEN_REMEDY}")
    api = HfApi(token=token)
    with _hub_errors(repo, "--repo", "check the repo id"):
        url = api.create_repo(repo_id, private=private or None, exist_ok=True)
        if url.repo_type != "model":
            raise UsageError(f"--repo {repo} is a {url.repo_type} repo on the Hub ({url}); an edit goes to a "
                             "model repo: pass another --repo")
        if revision:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        message = commit_message or f"Upload the erasure-suite edit {path.resolve().name}"
        info = api.upload_folder(repo_id=url.repo_id, folder_path=path, allow_patterns=patterns, revision=revision,
                                 commit_message=message)
    return url.repo_id, info
