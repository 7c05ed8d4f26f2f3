"""Hugging Face ``datasets`` data sets as rows (``dict[str, str]``), for ``--data``.

Three forms, told apart by what the path is:

* a ``save_to_disk`` folder (``state.json`` or ``dataset_dict.json`` inside): ``load_from_disk``;
* any other folder: a local dataset folder (csv / json / parquet / text files, or a dataset
  script-free hub layout) through ``load_dataset(folder)``;
* a name that is not a path (``org/name`` or ``name``): a dataset on the hub, through
  ``load_dataset(name, config)``, which uses the ``datasets`` cache first and honours
  ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``.

``split`` picks one split of a multi-split dataset (default ``train``, for evaluation data
``validation`` then ``test``); ``config`` is the hub
dataset's configuration name. Values that are not strings become JSON text (``0`` -> ``"0"``),
as for JSON-lines files, so labels and templates work the same whatever the source.
The ``datasets`` package is an optional extra: without it, one line says how to install it.
"""

from __future__ import annotations

import json
from pathlib import Path

from softprompt.config import UserError


def _lib():
    try:
        import datasets
    except ImportError:
        raise UserError("reading a 'datasets' data set needs the datasets package: pip install 'softprompt[datasets]'") from None
    return datasets


def is_dataset(path: str | Path) -> bool:
    """A folder (saved or local dataset) or a name that is not a file: not one of our file formats."""
    p = Path(path)
    return p.is_dir() or (not p.exists() and not p.suffix)


def _pick(ds, name: str, split: str | None, default: tuple[str, ...]):
    """One split of a DatasetDict (``split``, else the first of ``default`` it has); a single
    Dataset as it is."""
    if not hasattr(ds, "keys"):
        own = None if ds.split is None else str(ds.split)
        if split is not None and own is not None and split != own:
            raise UserError(f"{name}: --data-split {split!r} given, but the data set holds the {own!r} split only")
        return ds
    want = split or next((d for d in default if d in ds), default[0])
    if want not in ds:
        raise UserError(f"{name}: no split {want!r}; splits are: {', '.join(ds)} (choose with --data-split)")
    return ds[want]


def _open(name: str, split: str | None, config: str | None, default: tuple[str, ...], cache_dir: Path | None = None):
    lib = _lib()
    p = Path(name)
    try:
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            return _pick(lib.load_from_disk(str(p)), name, split, default)
        kw = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
        return _pick(lib.load_dataset(str(p) if p.is_dir() else name, config, **kw), name, split, default)
    except UserError:
        raise
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        where = "folder" if p.is_dir() else "data set on the hub (or in the datasets cache)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--data {name}: cannot read it as a {where}: {first}") from None


def _text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def read_dataset(name: str | Path, split: str | None = None, config: str | None = None,
                 limit: int | None = None, default: tuple[str, ...] = ("train",),
                 cache_dir: Path | None = None) -> list[dict[str, str]]:
    """Rows of a ``datasets`` data set (the first ``limit`` of them); without ``split``, the first
    split of ``default`` that the data set has. ``cache_dir``: where a hub data set is cached
    (default: the library's cache)."""
    ds = _open(str(name), split, config, default, cache_dir)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    rows = [{k: _text(v) for k, v in r.items()} for r in ds]
    if not rows:
        raise UserError(f"{name}: no data rows")
    return rows
