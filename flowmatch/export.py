"""Export a trained run as a folder anyone can load, and share it on the Hugging Face Hub.

``flowmatch export RUN --out DIR`` (:func:`export_run`) writes three files, none of them a pickle:

* ``model.safetensors``: one set of weights, the EMA copy (``raw=True``: the training weights);
* ``config.json``: ``{"format": "flowmatch-export", "format_version": 1, "flowmatch_version",
  "weights": "ema" | "raw", "step", "config" (the resolved config), "data_shape", "num_classes",
  "class_names", "latent"}``; ``latent`` is what decoding a latent model's samples needs (the VAE
  source, the latent normalisation, the image size), null for pixel models;
* ``README.md``: a short model card (what the Hub shows on the repository's page).

Reading one is the checkpoint layer's job (:func:`flowmatch.checkpoint.find_checkpoint` and
``load_checkpoint``), so :meth:`flowmatch.run.Run.load` -- and with it ``flowmatch sample``,
``eval nll``, distillation teachers and ``train.init_from`` -- takes ``DIR`` or
``hf://owner/name[@revision]`` wherever it takes a run directory. :func:`push_to_hub` uploads a
folder with ``huggingface_hub`` (the ``hub`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import flowmatch
from flowmatch.atomic import atomic_open, atomic_write_json
from flowmatch.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    EXPORT_WEIGHTS,
    SAMPLE_KEYS,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    read_export_config,
)
from flowmatch.config import ConfigError, config_from_dict, config_to_dict

__all__ = ["MODEL_CARD", "export_config", "export_run", "push_to_hub", "write_safetensors"]

MODEL_CARD = "README.md"


def export_config(state: dict, raw: bool = False) -> dict:
    """The config.json of an export of the checkpoint ``state`` (its EMA weights, or the training
    weights when ``raw``). The stored config is checked by the strict loader first: an export
    always loads."""
    try:
        config = config_to_dict(config_from_dict(state["config"]))
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint's stored config is unusable: {e}") from None
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "flowmatch_version": flowmatch.__version__,
        "weights": "raw" if raw else "ema", "step": int(state.get("step", 0)), "config": config,
        "data_shape": [int(s) for s in state["data_shape"]], "num_classes": int(state["num_classes"]),
        "class_names": state.get("class_names"), "latent": state.get("latent"),
    }


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``tensors`` as a safetensors file at ``path``, atomically (temporary file, then rename).

    Each tensor is copied to a contiguous CPU tensor of its own: safetensors refuses tensors that
    share memory (tied weights), and a state dict may hold views."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise ImportError("flowmatch export needs safetensors: pip install 'flowmatch[export]'") from None
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"the weights hold non-tensor entries {bad[:3]}: not exportable")
    blob = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata)
    with atomic_open(path, "wb") as f:
        f.write(blob)


def _check_out(out: Path) -> None:
    """Refuse to export into a run directory, or over a folder holding another library's
    config.json (a VAE, a transformers model): only our own export is replaced."""
    if (out / "checkpoints").exists() or (out / "latest.pt").exists():  # find_checkpoint's first picks
        raise ValueError(f"--out: {out} is a run directory; export into a folder of its own")
    if (out / EXPORT_CONFIG).is_file():
        try:
            read_export_config(out)
        except CheckpointError:
            raise ValueError(f"--out: {out} holds a {EXPORT_CONFIG} that is not a flowmatch export; "
                             "choose another folder") from None


def _model_card(meta: dict, repo_id: str | None) -> str:
    """A short README.md: what the model is and how to load it (metadata the Hub indexes on top)."""
    cfg, source = meta["config"], f"hf://{repo_id}" if repo_id else "DIR"
    classes = f", {meta['num_classes']} classes" if meta["num_classes"] else ""
    latent = f", latents of the VAE {meta['latent']['vae']}" if meta["latent"] else ""
    return (
        "---\nlibrary_name: flowmatch\ntags:\n- flow-matching\n- generative-model\n---\n\n"
        f"# {cfg['name']}\n\n"
        f"A flow-matching model ({cfg['model']['arch']}, {meta['weights']} weights of training step "
        f"{meta['step']}) on data of shape {tuple(meta['data_shape'])}{classes}{latent}, exported by "
        f"flowmatch {meta['flowmatch_version']}. Time convention: t = 0 is noise, t = 1 is data.\n\n"
        "```bash\npip install 'flowmatch[hub]'\n"
        f"flowmatch sample {source} --n 16 --out grid.png\n```\n\n"
        f"```python\nfrom flowmatch.run import Run\nrun = Run.load(\"{source}\")\n```\n"
    )


def export_run(source: str | Path, out: str | Path, *, raw: bool = False,
               repo_id: str | None = None) -> dict:
    """Write the run at ``source`` (a run directory, checkpoint file, exported folder or ``hf://``
    source) to the folder ``out``: model.safetensors, config.json and a README.md model card
    (naming ``repo_id`` as the place to load from, when given). Returns the config.json dict.

    Raises :class:`CheckpointError` for an unusable source, ValueError for an ``out`` that is a run
    directory or holds another library's config.json.
    """
    file = find_checkpoint(source)
    key = "model" if raw else "ema"
    state = load_checkpoint(file, map_location="cpu", require=(*SAMPLE_KEYS, key))
    out = Path(out)
    _check_out(out)
    meta = export_config(state, raw)
    out.mkdir(parents=True, exist_ok=True)
    # the weights first: config.json is what marks a folder as an export
    # one metadata entry: safetensors writes several in a random order, and an export should be
    # the same bytes each time (sample folders record their checkpoint's sha256)
    marker = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "weights": meta["weights"]}
    write_safetensors(state[key], out / EXPORT_WEIGHTS, {"flowmatch": json.dumps(marker)})
    atomic_write_json(out / EXPORT_CONFIG, meta)
    with atomic_open(out / MODEL_CARD, "w") as f:
        f.write(_model_card(meta, repo_id))
    return meta


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None,
                commit_message: str | None = None) -> str:
    """Upload the exported ``folder`` to the Hub model repository ``repo_id`` (created if needed,
    ``private`` when it is new); returns the repository's URL.

    Authentication is huggingface_hub's own: the ``HF_TOKEN`` environment variable or the token
    ``hf auth login`` stored. Raises ImportError without the ``hub`` extra; the hub's HTTP errors
    (no network, no write access) are OSErrors naming the cause.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("--push-to-hub needs huggingface_hub: pip install 'flowmatch[hub]'") from None
    meta = read_export_config(folder)  # only an export of ours goes up
    api = HfApi()
    url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message=commit_message or f"flowmatch export (step {meta['step']})",
                      allow_patterns=[EXPORT_CONFIG, EXPORT_WEIGHTS, MODEL_CARD])
    return str(url)
