"""Calibration and evaluation text: where it comes from and how it becomes token windows.

A DATA argument is one of
  - a path: a text file, or a folder whose `*.txt` / `*.md` files are read in sorted order;
  - `builtin:sense-and-sensibility`, `builtin:persuasion`: the shipped public-domain corpus;
  - `builtin:mixed`: several domains from the shipped corpus and Python's standard library (`mixed_text`);
  - `builtin:mixed-prose`: the same domains with the novel kept at 3/4 of the characters (`mixed_text(0.75)`):
    threshold statistics stay mostly on prose while training also sees code and other prose;
  - `python-docs`: Python's own documentation prose, from the standard library (no network);
  - `hf:NAME[:CONFIG[:SPLIT]]` or `wikitext-2`: a Hugging Face dataset (needs the network or a local cache).
"""

import importlib.resources
import itertools
import sysconfig
from pathlib import Path

import torch

BUILTIN = {
    "sense-and-sensibility": "sense_and_sensibility.txt",
    "persuasion": "persuasion.txt",
}
MIXED = "mixed"
# builtin:mixed-prose: the novel's share of the characters (the code and prose pieces cut to fit).
MIXED_PROSE = "mixed-prose"
MIXED_PROSE_NOVEL_SHARE = 0.75
BUILTIN_NAMES = (*BUILTIN, MIXED, MIXED_PROSE)  # every `builtin:NAME`
# builtin:mixed's standard-library parts: source code (docstrings and comments included) of these modules, and
# the prose files of a CPython install (licence, IDLE's change logs) that exist. Neither evaluation text is in
# it: no Persuasion, and no documentation prose (python-docs, IDLE's help.html).
MIXED_STDLIB_MODULES = ("argparse", "calendar", "configparser", "dataclasses", "difflib", "fractions", "pathlib",
                        "shutil", "textwrap", "zipfile")
MIXED_STDLIB_PROSE = ("LICENSE.txt", "idlelib/NEWS.txt", "idlelib/HISTORY.txt", "idlelib/README.txt")
MIXED_PIECES = 32
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
        builtins = ", ".join("builtin:" + k for k in BUILTIN_NAMES)
        raise DataError(
            f"DATA {spec!r} is neither an existing file or folder nor a known source; use a path, "
            f"{builtins}, python-docs, or hf:NAME[:CONFIG[:SPLIT]]"
        )
    if not text.strip():
        raise DataError(f"DATA {spec!r} holds no text")
    return text


def same_source(a: str, b: str) -> bool:
    """Whether two DATA arguments name one text (the same spec, alias or path)."""
    a, b = HF_ALIASES.get(a.lower(), a), HF_ALIASES.get(b.lower(), b)
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


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


def _pieces(text: str, n: int) -> list[str]:
    """`text` cut at line ends into `n` pieces of near-equal length (fewer if it has fewer lines)."""
    lines = text.splitlines(keepends=True)
    bounds = [round(i * len(lines) / n) for i in range(n + 1)]
    return ["".join(lines[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def _head(piece: str, fraction: float) -> str:
    """The first lines of `piece`, up to about `fraction` of its characters (at least one line)."""
    out, size, target = [], 0, fraction * len(piece)
    for line in piece.splitlines(keepends=True):
        if out and size + len(line) > target:
            break
        out.append(line)
        size += len(line)
    return "".join(out)


def mixed_text(novel_share: float | None = None) -> str:
    """A novel, standard-library source code and other English prose, interleaved in `MIXED_PIECES` rounds so
    that every slice of it (threshold statistics at the start, training windows, check windows at the end)
    holds each domain: calibration that is not tuned to one kind of text.

    Every source is whole by default (the novel about half the characters). With `novel_share` (0-1), every
    code and prose piece is cut to its first lines, all by the same fraction, so that the novel, whole, is
    about that share of the characters; the other domains still appear in every round, from every module.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "\n\n".join((stdlib / f"{m}.py").read_text(encoding="utf-8") for m in MIXED_STDLIB_MODULES)
    prose = "\n\n".join((stdlib / f).read_text(encoding="utf-8") for f in MIXED_STDLIB_PROSE
                         if (stdlib / f).is_file())
    novel = _pieces(_read_builtin("sense-and-sensibility"), MIXED_PIECES)
    others = [_pieces(t, MIXED_PIECES) for t in (code, prose) if t]
    if novel_share is not None:
        if not 0 < novel_share <= 1:
            raise DataError(f"novel_share must be in (0, 1], got {novel_share}")
        budget = sum(map(len, novel)) * (1 - novel_share) / novel_share
        fraction = min(1.0, budget / max(1, sum(len(p) for ps in others for p in ps)))
        others = [[_head(p, fraction) for p in ps] if fraction > 0 else [] for ps in others]
    sources = [novel, *(ps for ps in others if ps)]
    return "\n\n".join(p for round_ in itertools.zip_longest(*sources, fillvalue="") for p in round_ if p)


def _read_builtin(name: str) -> str:
    if name == MIXED:
        return mixed_text()
    if name == MIXED_PROSE:
        return mixed_text(MIXED_PROSE_NOVEL_SHARE)
    if name not in BUILTIN:
        raise DataError(f"unknown builtin corpus {name!r}; choose one of {sorted(BUILTIN_NAMES)}")
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
