"""Training images: sources (folders, list files, ``datasets``) and their decoding in workers.

A source is an indexable collection of raw images (paths, bytes, PIL images); decoding follows the
image policy of :mod:`jmllm.align.images` and happens in DataLoader workers (or a process pool for
streams). An image that cannot be decoded is dropped from its batch and counted, never fatal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jmllm.align.features import ImageNormalization, PaddedSquareNormalization, image_to_tensor
from jmllm.align.images import ImageLoadError, open_image
from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, get_preprocessing
from jmllm.align.train.config import TrainConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class ImageSource:
    """An indexable collection of raw images (paths, bytes or PIL images), decoded lazily."""

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> Any:
        raise NotImplementedError


class PathSource(ImageSource):
    """Image files: every image under folders (recursively) and every line of list files."""

    def __init__(self, entries: Sequence[str | os.PathLike[str]]) -> None:
        paths: list[str] = []
        for entry in entries:
            entry = Path(entry)
            if entry.is_dir():
                found = [
                    p
                    for p in entry.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                ]
                paths.extend(str(p) for p in sorted(found))  # sorted: the order is the seed's
            elif entry.is_file():
                paths.extend(_read_list_file(entry))
            else:
                raise ValueError(f"{entry}: no such image folder or list file")
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: int) -> Any:
        return self.paths[index]


def _read_list_file(path: Path) -> list[str]:
    """One image path per line; blank lines and ``#`` comments ignored; relative to the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the image list ({exc})") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        out.append(str(p if p.is_absolute() else path.parent / p))
    return out


class DatasetSource(ImageSource):
    """An image column of a (non-streaming) ``datasets`` dataset; decoding happens in workers."""

    def __init__(self, dataset: Any, image_column: str) -> None:
        self.dataset = _undecoded_column(dataset, image_column)
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, index: int) -> Any:
        return self.dataset[index][self.image_column]


def _datasets() -> Any:
    """The ``datasets`` module, which only this path needs (the ``jmllm-align[datasets]`` extra)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "training from a dataset needs the datasets package: "
            "pip install 'jmllm-align[datasets]'"
        ) from None
    return datasets


def _undecoded_column(dataset: Any, column: str) -> Any:
    datasets = _datasets()

    names = list(dataset.features or {}) if dataset.features is not None else []
    if names and column not in names:
        raise ValueError(
            f"dataset has no image column {column!r} (columns: {', '.join(names)}); "
            "pass --image-column"
        )
    if dataset.features is not None and isinstance(dataset.features.get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _load_dataset(config: TrainConfig) -> Any:
    datasets = _datasets()

    try:
        return datasets.load_dataset(
            config.dataset,
            config.dataset_config,
            split=config.dataset_split,
            streaming=config.dataset_streaming,
            data_dir=config.dataset_data_dir,
        )
    except Exception as exc:  # datasets raises many types: network, missing config, ...
        raise ValueError(f"dataset {config.dataset}: could not be loaded ({exc})") from None


def decode_image(raw: Any, preprocessing: str = INTERACTIVE_PREPROCESSING) -> torch.Tensor:
    """Decode one raw image (path, ``{"bytes", "path"}`` dict, bytes or PIL) to (3, H, W) uint8,
    under the image policy (:mod:`jmllm.align.images`: pixel limit from the header, reduced
    JPEG decoding, working copy of at most 4096 px); the EXIF orientation is applied under the
    ``exif`` preprocessing and ignored under ``authors`` (:mod:`jmllm.align.preprocessing`).

    Raises:
        ImageLoadError: the image cannot be decoded or is refused; the message names it.
    """
    name = None
    exif = get_preprocessing(preprocessing).exif_orientation
    if isinstance(raw, dict):
        data, name = raw.get("bytes"), raw.get("path") or "<bytes>"
        raw = data if data is not None else name
    try:
        return image_to_tensor(open_image(raw, name=name, exif_orientation=exif).image)
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises assorted errors on odd files during conversion
        raise ImageLoadError(f"{name or raw}: not a readable image ({exc})") from None


# A decoded image is either (3, H, W) uint8 pixels, normalised on the training device, or, when
# preprocessing runs in the workers (CPU training), the pair of normalised model inputs
# ((3, S_owl, S_owl), (3, S_llava, S_llava)) float32: the same ImageNormalization code either way.
Pixels = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Normalizations = tuple[ImageNormalization | PaddedSquareNormalization, ImageNormalization]


@dataclass
class DecodedImage:
    """One image after decoding in a worker: its pixels, or the error that made it unreadable."""

    pixels: Pixels | None
    error: str | None = None


@dataclass
class ImageBatch:
    """A rank's decoded images for one optimizer step, with the failures dropped and counted."""

    images: list[Pixels]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _decode(
    raw: Any, norms: Normalizations | None = None, preprocessing: str = INTERACTIVE_PREPROCESSING
) -> DecodedImage:
    try:
        pixels = decode_image(raw, preprocessing)
    except ImageLoadError as exc:
        return DecodedImage(None, str(exc))
    if norms is None:
        return DecodedImage(pixels)
    owl = norms[0]([pixels], preprocessing=preprocessing)[0]
    return DecodedImage((owl, norms[1]([pixels], preprocessing=preprocessing)[0]))


def collate_drop_failures(items: list[DecodedImage]) -> ImageBatch:
    """DataLoader collate: keep decoded images (variable sizes, so a list), count failures."""
    batch = ImageBatch(images=[])
    for item in items:
        if item.pixels is None:
            batch.skipped += 1
            batch.errors.append(item.error or "unreadable image")
        else:
            batch.images.append(item.pixels)
    return batch


class _DecodeItems(torch.utils.data.Dataset):
    """Map-style view of a source that decodes in the DataLoader worker."""

    def __init__(
        self,
        source: ImageSource,
        norms: Normalizations | None = None,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> None:
        self.source, self.norms, self.preprocessing = source, norms, preprocessing

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> DecodedImage:
        try:
            raw = self.source.raw(index)
        except Exception as exc:  # a broken row of a dataset is one skipped image
            return DecodedImage(None, f"item {index}: cannot be read ({exc})")
        return _decode(raw, self.norms, self.preprocessing)


def _stream_shares(
    stream: Any, image_column: str, batch_size: int, rank: int, world: int, start_step: int
) -> Iterator[list[Any]]:
    """Raw images of this rank's share of every global batch of a stream, from ``start_step``."""
    pending: list[Any] = []
    step = 0
    for row in stream:
        pending.append(row[image_column])
        if len(pending) < batch_size:
            continue
        if step >= start_step:
            yield pending[rank::world]
        pending, step = [], step + 1


def _decode_share(
    share: list[Any], norms: Normalizations | None, preprocessing: str = INTERACTIVE_PREPROCESSING
) -> ImageBatch:
    return collate_drop_failures([_decode(raw, norms, preprocessing) for raw in share])


def _stream_batches(
    shares: Iterator[list[Any]],
    norms: Normalizations | None,
    workers: int,
    preprocessing: str = INTERACTIVE_PREPROCESSING,
) -> Iterator[ImageBatch]:
    """Decode streamed shares in order, in ``workers`` processes with bounded prefetch.

    The stream itself is read here, in one process (``datasets`` would split a stream between
    DataLoader workers by shard, so the order would depend on the number of workers); only the
    decoding is spread out, so a resumed run sees exactly the same batches.
    """
    if workers == 0:
        for share in shares:
            yield _decode_share(share, norms, preprocessing)
        return
    import collections
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_worker_init,
        initargs=(0,),
    )
    in_flight: collections.deque[Future[ImageBatch]] = collections.deque()
    try:
        for share in shares:
            in_flight.append(pool.submit(_decode_share, share, norms, preprocessing))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_all(raws: list[Any], preprocessing: str = INTERACTIVE_PREPROCESSING) -> ImageBatch:
    return collate_drop_failures([_decode(raw, None, preprocessing) for raw in raws])


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is per-image; threads would only fight each other
