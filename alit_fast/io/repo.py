"""A model as a directory in the Hugging Face Hub layout: ``model.safetensors`` (the alit_fast model
file, config in its metadata), ``config.json`` (the same config, readable without safetensors) and
``README.md`` (a generated model card). Written here; read by ``alit_fast.io.pretrained``.

``huggingface_hub`` is needed only to talk to the Hub (``pip install 'alit_fast[hub]'``); writing and
reading a directory needs nothing beyond the core dependencies.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..files import write_atomic
from .weights import save_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
REPO_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
# config.json names its library, so a directory holding another library's model is refused by name
LIBRARY_NAME = "alit_fast"


def require_hub():
    """The huggingface_hub module, or a one-line error saying how to get it."""
    try:
        import huggingface_hub
    except ImportError as exc:  # optional: only the Hub needs it
        raise ImportError("the Hugging Face Hub needs huggingface_hub: pip install 'alit_fast[hub]'") from exc
    return huggingface_hub


# exception classes (by name: they come from huggingface_hub's HTTP stack, whichever it uses) that
# mean the Hub could not be reached, as opposed to a refusal by the Hub
NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError", "Timeout", "NameResolutionError",
                  "MaxRetryError", "OfflineModeIsEnabled")


def unreachable_hub(exc: BaseException) -> str | None:
    """A short cause when ``exc`` (or what it was raised from) means the Hub could not be reached
    (no network, DNS, a firewall, a timeout); None for any other failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in NETWORK_ERRORS:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        exc = exc.__cause__ or exc.__context__
    return None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def model_card(model: torch.nn.Module, repo_id: str | None = None, evaluation: dict | None = None) -> str:
    """README.md for a model directory: how to load it, its config and, when given, its evaluation
    (``{"rows": [{"name": ..., metric: value, ...}, ...]}`` as ``alit-fast evaluate`` writes, or any dict)."""
    cfg = json.loads(model.config.to_json())
    params = sum(p.numel() for p in model.parameters())
    name = repo_id or "OWNER/REPO"
    lines = [
        "---",
        f"library_name: {LIBRARY_NAME}",
        "tags:",
        "- image-tokenization",
        "- alit",
        "---",
        "",
        f"# {repo_id or 'ALIT tokenizer'}",
        "",
        "An ALIT tokenizer (Adaptive Length Image Tokenization via Recurrent Allocation, ICLR 2025) in "
        "the alit_fast format: each image becomes a 1D token sequence whose length is chosen per image.",
        "",
        "```python",
        "import alit_fast",
        f'model = alit_fast.load("hf-hub:{name}")',
        # the official encode API's rule and default: valid for VQGAN and VAE bases, and for models
        # after stage 2 (whose codes no longer track the base tokenizer's)
        'tokens = model.encode(images, criterion="pixel-l1:0.07")   # float [B, 3, H, W] in [0, 1]',
        "recon = model.decode(tokens)",
        "```",
        "",
        "## Config",
        "",
        f"- parameters: {params:,} (base tokenizer included)",
        f"- base tokenizer: {model.config.base_tokenizer}; 1D tokens: "
        + ("quantized" if model.config.quantize_latent else "continuous"),
        f"- image size {model.config.image_size}, {model.config.tokens_per_iter} tokens per iteration, "
        f"{model.config.tokens_per_iter}..{model.config.max_tokens} tokens",
        "",
        "```json",
        json.dumps(cfg, indent=2, sort_keys=True),
        "```",
    ]
    if evaluation:
        lines += ["", "## Evaluation", ""]
        rows = evaluation.get("rows") if isinstance(evaluation, dict) else None
        if rows and all(isinstance(r, dict) for r in rows):
            keys = [k for k in rows[0] if k != "name"]
            lines.append("| row | " + " | ".join(keys) + " |")
            lines.append("|---" * (len(keys) + 1) + "|")
            for row in rows:
                lines.append(f"| {row.get('name', '')} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
        else:
            lines += ["```json", json.dumps(evaluation, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines) + "\n"


def save_pretrained(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    evaluation: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hub-layout directory. A directory that already holds any of the three
    files is only replaced with ``overwrite=True``; other files in it are never touched."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_pretrained: {out} exists and is not a directory")
    present = [name for name in REPO_FILES if (out / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"save_pretrained: {out} already holds {', '.join(present)}; pass overwrite=True to replace them")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"save_pretrained: {out} is not writable")
    save_model(model, out / WEIGHTS_NAME)
    document = {"library_name": LIBRARY_NAME, "config": json.loads(model.config.to_json())}
    _write_text(out / CONFIG_NAME, json.dumps(document, indent=2, sort_keys=True) + "\n")
    _write_text(out / CARD_NAME, model_card(model, repo_id, evaluation))
    return out


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload ALIT tokenizer (alit_fast)",
    evaluation: dict | None = None,
) -> str:
    """Upload ``model`` to the Hub repo ``repo_id`` (created if missing); returns the commit URL."""
    check_repo_id(repo_id)
    hub = require_hub()
    api = hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp, repo_id=repo_id, evaluation=evaluation)
            info = api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision, commit_message=commit_message)
    except Exception as exc:  # the Hub client raises many kinds; a network failure gets one plain line
        cause = unreachable_hub(exc)
        if cause is None:
            raise
        raise ConnectionError(f"cannot upload to {repo_id!r}: the Hugging Face Hub ({hub_endpoint()}) cannot be "
                              f"reached; check the network ({cause})") from exc
    return str(getattr(info, "commit_url", info))


def check_repo_id(repo_id: str) -> str:
    """``OWNER/REPO``, each part a non-empty name of letters, digits, '-', '_' and '.'."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    ok = len(parts) == 2 and all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)
    if not ok or any(p in (".", "..") for p in parts):
        raise ValueError(f"Hub repo id must look like OWNER/REPO, got {repo_id!r}")
    return repo_id
