"""Calibration and evaluation text: where it comes from and how it becomes token windows.

A DATA argument is one of
  - a path: a text file, or a folder whose `*.txt` / `*.md` files are read in sorted order;
  - `builtin:sense-and-sensibility`, `builtin:persuasion`: the shipped public-domain corpus;
  - `python-docs`: Python's own documentation prose, from the standard library (no network);
  - `hf:NAME[:CONFIG[:SPLIT]]` or `wikitext-2`: a Hugging Face dataset (needs the network or a local cache).
"""

import importlib.resources
from pathlib import Path

import torch

BUILTIN = {
    "sense-and-sensibility": "sense_and_sensibility.txt",
    "persuasion": "persuasion.txt",
}
DEFAULT_CALIBRATION_DATA = "builtin:sense-and-sensibility"
DEFAULT_EVAL_DATA = "builtin:persuasion"
HF_ALIASES = {"wikitext-2": "hf:wikitext:wikitext-2-raw-v1:test", "wikitext2": "hf:wikitext:wikitext-2-raw-v1:test"}
TEXT_SUFFIXES = (".txt", ".md", ".text")


class DataError(ValueError):
    """Calibration or evaluation text is missing, empty or too short."""


def load_text(spec: str) -> str:
    """Resolve a DATA argument to one string of text."""
    spec = HF_ALIASES.get(spec.lower(), spec)
    path = Path(spec).expanduser()
    if path.exists():
        text = _read_path(path)
    elif spec.startswith("builtin:"):
        text = _read_builtin(spec.removeprefix("builtin:"))
    elif spec == "python-docs":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif spec.startswith("hf:"):
        text = _read_hf_dataset(spec.removeprefix("hf:"))
    else:
        raise DataError(
            f"DATA {spec!r} is neither an existing file or folder nor a known source; use a path, "
            f"{', '.join('builtin:' + k for k in BUILTIN)}, python-docs, or hf:NAME[:CONFIG[:SPLIT]]"
        )
    if not text.strip():
        raise DataError(f"DATA {spec!r} holds no text")
    return text


def _read_path(path: Path) -> str:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    try:
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None


def _read_builtin(name: str) -> str:
    if name not in BUILTIN:
        raise DataError(f"unknown builtin corpus {name!r}; choose one of {sorted(BUILTIN)}")
    return importlib.resources.files("vllm_spon.calibration").joinpath("corpus", BUILTIN[name]).read_text()


def _read_hf_dataset(spec: str) -> str:
    name, config, split = ([*spec.split(":"), None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data needs the `datasets` package: pip install 'vllm-spon[calibration]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # network, missing dataset, missing config: all the user's to fix
        raise DataError(f"could not load Hugging Face dataset {spec!r}: {e}") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n".join(str(t) for t in ds[column])


def token_windows(tokenizer, text: str, window: int, num_windows: int | None, source: str = "DATA",
                  offset_windows: int = 0) -> torch.Tensor:
    """`num_windows` consecutive, non-overlapping windows of `window` tokens, as a [num_windows, window] tensor
    (None: as many as the text holds, at least one).

    `offset_windows` skips that many windows first, so two callers can take disjoint slices of one text.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if num_windows is None:
        num_windows = max(1, len(ids) // window - offset_windows)
    if window < 2 or num_windows < 1:
        raise DataError(f"need window >= 2 and at least one window, got window={window}, windows={num_windows}")
    need = (offset_windows + num_windows) * window
    if len(ids) < need:
        raise DataError(
            f"{source} has {len(ids)} tokens, too short for {num_windows} windows of {window} tokens"
            f"{f' after skipping {offset_windows} windows' if offset_windows else ''} ({need} needed); "
            "give more text or ask for fewer/shorter windows"
        )
    start = offset_windows * window
    return torch.tensor(ids[start:need], dtype=torch.long).view(num_windows, window)
