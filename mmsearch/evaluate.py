"""Retrieval quality of an index on labelled queries: R@K, P@K, mAP@K, nDCG@K and MRR per direction.

Three label sources (one per run):

* relevant-by FIELD: the catalog labels itself through a metadata field (e.g. category).
  text->image: every distinct caption of the index is one query (its vector is the stored caption
  vector), ranked against every item image; relevant = the items whose FIELD value is one of the
  values of the items carrying that caption (several values when identical captions span them).
  image->text: every item image is one query, ranked against every item caption; relevant = the
  other items with the same FIELD value. The query item's own caption is removed from its ranking:
  it was written for that very picture, so ranking it first would measure caption pairing (what the
  Karpathy protocol measures) rather than finding same-FIELD items, and it would inflate R@1.
  Items without a FIELD value are never queries and never relevant, but stay in the ranking as
  distractors.
* qrels FILE: JSONL lines {"query": TEXT-or-IMAGE-PATH, "relevant": [catalog ids]} (or "text" /
  "image" instead of "query"), optional "target": "image" | "text". The direction follows the query
  kind: text queries rank item images, image queries rank captions, unless "target" says otherwise.
  Relative image paths are relative to the qrels file (as in catalogs). A relevant id that is not in
  the index (or has no vector of the target modality) still counts as relevant: it is never found.
* karpathy FILE: the Flickr30k / COCO Karpathy test split and the CLIP-paper protocol. The index
  must hold the test images; they are ranked among themselves only (other indexed items are
  ignored). text->image: each of the ~5N captions, encoded from the JSON with the index's model,
  is a query and its own image is relevant; image->text: each image ranks all ~5N captions and its
  own captions are relevant.

Ranking is exact: brute-force dot products of the query vectors with every stored vector of the
target modality (all vectors are L2-normalised), not the FAISS candidate stage, so the numbers
measure the model rather than the approximate index. Ties keep the store's id order (stable sort).
A query with no relevant item at all is skipped: it would score 0 whatever the ranking.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import IMAGE_EXTENSIONS
from .errors import CatalogError, MMSearchError, QueryError
from .karpathy import KarpathyImage, load_karpathy
from .metrics import summarize
from .search import QueryPart, Searcher
from .store import Item

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total), as in ingest

DIRECTIONS = ("text->image", "image->text")
ALL_DIRECTIONS = (*DIRECTIONS, "text->text", "image->image")  # qrels may ask for same-modality ranking
DEFAULT_KS = (1, 5, 10)
SCORE_CELLS_PER_BATCH = 4_000_000  # queries x corpus scores sorted at once: bounds memory (~32 MB of order)
ENCODE_BATCH = 256  # qrels queries loaded and encoded together


@dataclass
class Task:
    """One direction: query vectors ranked against a corpus, relevance as corpus positions."""

    queries: np.ndarray  # (Q, d) float32
    corpus: np.ndarray  # (N, d) float32
    relevant: list[set[int]]  # per query; negative numbers stand for relevant ids absent from the corpus
    excluded: list[int | None] | None = None  # per query: a corpus position left out of its ranking

    def __len__(self) -> int:
        return len(self.relevant)

    def head(self, n: int) -> Task:
        excluded = self.excluded[:n] if self.excluded is not None else None
        return replace(self, queries=self.queries[:n], relevant=self.relevant[:n], excluded=excluded)


@dataclass
class IndexContent:
    """Everything the protocols need from an index, read once from its store."""

    items: dict[int, Item]
    fields: set[str]
    image_ids: np.ndarray  # item ids with an image vector, in id order
    image_vectors: np.ndarray
    text_ids: np.ndarray  # item ids with a caption vector, in id order
    text_vectors: np.ndarray

    @classmethod
    def load(cls, searcher: Searcher) -> IndexContent:
        collection = searcher.collection
        image_ids, image_vectors = collection.all_vectors("image")
        text_ids, text_vectors = collection.all_vectors("text")
        items = collection.store.items(np.union1d(image_ids, text_ids).tolist())
        return cls(items, collection.store.field_names(), image_ids, image_vectors, text_ids, text_vectors)

    def ids(self, modality: str) -> np.ndarray:
        return self.image_ids if modality == "image" else self.text_ids

    def vectors(self, modality: str) -> np.ndarray:
        return self.image_vectors if modality == "image" else self.text_vectors


# -- the entry point ------------------------------------------------------------------------------
def evaluate_index(index_dir: Path, relevant_by: str | None = None, qrels: Path | None = None,
                   karpathy: Path | None = None, karpathy_images: Path | None = None,
                   directions: Sequence[str] | None = None, ks: Sequence[int] = DEFAULT_KS,
                   max_queries: int | None = None, progress: Progress | None = None) -> dict:
    """Metrics per direction: {"text->image": summarize(...), "image->text": ..., "protocol", "index"}.

    `directions` defaults to both cross-modal directions (for qrels: every direction its lines ask
    for). `max_queries` keeps the first N queries of each direction. Each direction's summary has
    "R@K" for K in ks (hit rate, the CLIP-paper R@K), "P@M", "mAP@M", "nDCG@M" for M = max(ks),
    "MRR", "queries" and "curve" ({K: R@K for K = 1..M}).
    """
    _check_label_source(relevant_by, qrels, karpathy, karpathy_images)
    ks = _check_ks(ks)
    wanted = _check_directions(directions)
    if max_queries is not None and max_queries < 1:
        raise MMSearchError("max_queries must be at least 1")
    progress = progress or (lambda stage, done, total: None)
    with Searcher(index_dir) as searcher:
        tasks, protocol = _build_tasks(searcher, relevant_by, qrels, karpathy, karpathy_images, wanted,
                                       max_queries, progress)
    result = {}
    for direction, task in tasks.items():
        if len(task):
            result[direction] = _summarize_task(direction, task, ks, max_queries, progress)
        else:
            log.warning("%s: no query has a relevant item; not evaluated", direction)
    if not result:
        raise MMSearchError(f"nothing to evaluate: no query has a relevant item ({protocol})")
    return {**result, "protocol": protocol, "index": str(index_dir)}


def _build_tasks(searcher, relevant_by, qrels, karpathy, karpathy_images, wanted, max_queries, progress
                 ) -> tuple[dict[str, Task], str]:
    content = IndexContent.load(searcher)
    if relevant_by is not None:
        return (relevant_by_tasks(content, relevant_by, wanted or DIRECTIONS),
                f"relevant-by {relevant_by} (image->text leaves out the query item's own caption)")
    if qrels is not None:
        return qrels_tasks(searcher, content, Path(qrels), wanted, max_queries, progress), f"qrels {qrels}"
    tasks = karpathy_tasks(searcher, content, Path(karpathy), karpathy_images, wanted or DIRECTIONS, progress)
    return tasks, f"karpathy {karpathy} (test split)"


def _check_label_source(relevant_by, qrels, karpathy, karpathy_images) -> None:
    given = [option for option, value in (("--relevant-by", relevant_by), ("--qrels", qrels),
                                          ("--karpathy", karpathy)) if value is not None]
    if not given:
        raise MMSearchError("no labels to evaluate with: give one of --relevant-by FIELD, --qrels FILE "
                            "or --karpathy FILE")
    if len(given) > 1:
        raise MMSearchError(f"give only one label source, not {' and '.join(given)}")
    if karpathy_images is not None and karpathy is None:
        raise MMSearchError("--images is the image folder of --karpathy; it has no use without it")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if not ks or any(int(k) < 1 for k in ks):
        raise MMSearchError(f"ks must be positive ranks, got {list(ks)}")
    return tuple(sorted({int(k) for k in ks}))


def _check_directions(directions: Sequence[str] | None) -> tuple[str, ...] | None:
    if directions is None:
        return None
    if not directions:
        raise MMSearchError("no direction to evaluate")
    unknown = [d for d in directions if d not in ALL_DIRECTIONS]
    if unknown:
        raise MMSearchError(f"unknown directions {unknown}; choose from {', '.join(ALL_DIRECTIONS)}")
    return tuple(directions)


def _summarize_task(direction: str, task: Task, ks, max_queries, progress) -> dict:
    if max_queries is not None:
        task = task.head(max_queries)
    runs = rank_task(task, max(ks), lambda done, total: progress(f"ranking {direction}", done, total))
    return summarize(runs, ks)


# -- exact ranking --------------------------------------------------------------------------------
def rank_task(task: Task, depth: int, progress: Callable[[int, int], None] | None = None
              ) -> list[tuple[list[int], set[int]]]:
    """(ranked corpus positions, relevant positions) per query, for metrics.summarize.

    A ranked list is cut after max(depth, rank of the first relevant item): every metric of
    summarize at cut-offs <= depth, and MRR, is then exactly that of the full ranking, without
    handing the whole corpus to the metrics for every query.
    """
    total = len(task)
    batch = max(1, SCORE_CELLS_PER_BATCH // max(1, len(task.corpus)))
    runs = []
    for start in range(0, total, batch):
        scores = task.queries[start : start + batch] @ task.corpus.T
        orders = np.argsort(-scores, axis=1, kind="stable")
        for row, order in enumerate(orders):
            query = start + row
            excluded = task.excluded[query] if task.excluded is not None else None
            runs.append((_ranked_prefix(order, task.relevant[query], excluded, depth), task.relevant[query]))
        if progress:
            progress(len(runs), total)
    return runs


def _ranked_prefix(order: np.ndarray, relevant: set[int], excluded: int | None, depth: int) -> list[int]:
    if excluded is not None:
        order = order[order != excluded]
    found = np.flatnonzero(np.isin(order, np.fromiter(relevant, dtype=np.int64, count=len(relevant))))
    cut = depth if found.size == 0 else max(depth, int(found[0]) + 1)
    return order[:cut].tolist()


# -- relevant-by FIELD ----------------------------------------------------------------------------
def relevant_by_tasks(content: IndexContent, field: str, directions: Sequence[str]) -> dict[str, Task]:
    if field not in content.fields:
        known = ", ".join(sorted(content.fields)) or "none"
        raise QueryError(f"unknown field {field!r} for --relevant-by; known fields: {known}")
    labels = {item_id: _label((item.meta or {}).get(field)) for item_id, item in content.items.items()}
    builders = {"text->image": _captions_to_images, "image->text": _images_to_captions}
    unsupported = [d for d in directions if d not in builders]
    if unsupported:
        raise MMSearchError(f"--relevant-by evaluates {' and '.join(builders)} only, not {', '.join(unsupported)}")
    return {direction: builders[direction](content, labels) for direction in directions}


def _label(value) -> str | int | float | None:
    """A hashable field value; None (missing, empty) means the item is unlabelled."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _positions_by_label(ids: np.ndarray, labels: dict) -> dict[object, set[int]]:
    grouped: dict[object, set[int]] = defaultdict(set)
    for position, item_id in enumerate(ids.tolist()):
        if labels[item_id] is not None:
            grouped[labels[item_id]].add(position)
    return grouped


def _captions_to_images(content: IndexContent, labels: dict) -> Task:
    images_by_label = _positions_by_label(content.image_ids, labels)
    rows_by_caption: dict[str, list[int]] = defaultdict(list)  # caption -> text positions, first seen first
    for position, item_id in enumerate(content.text_ids.tolist()):
        rows_by_caption[content.items[item_id].caption].append(position)
    query_rows, relevant = [], []
    for rows in rows_by_caption.values():
        caption_labels = {labels[int(content.text_ids[row])] for row in rows} - {None}
        wanted = set().union(*(images_by_label.get(label, set()) for label in caption_labels))
        if wanted:
            query_rows.append(rows[0])  # identical captions have identical vectors
            relevant.append(wanted)
    return Task(content.text_vectors[query_rows], content.image_vectors, relevant)


def _images_to_captions(content: IndexContent, labels: dict) -> Task:
    captions_by_label = _positions_by_label(content.text_ids, labels)
    caption_row = {item_id: row for row, item_id in enumerate(content.text_ids.tolist())}
    query_rows, relevant, excluded = [], [], []
    for position, item_id in enumerate(content.image_ids.tolist()):
        if labels[item_id] is None:
            continue
        own = caption_row.get(item_id)
        wanted = captions_by_label.get(labels[item_id], set()) - {own}
        if wanted:
            query_rows.append(position)
            relevant.append(wanted)
            excluded.append(own)
    return Task(content.image_vectors[query_rows], content.text_vectors, relevant, excluded)


# -- qrels ----------------------------------------------------------------------------------------
@dataclass
class Judgement:
    """One qrels line."""

    part: QueryPart
    target: str
    relevant: list[str]
    line: int

    @property
    def direction(self) -> str:
        return f"{self.part.kind}->{self.target}"


def read_qrels(path: Path) -> list[Judgement]:
    if not path.is_file():
        raise CatalogError(f"qrels file not found: {path}")
    judgements = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            judgements.append(_parse_judgement(line, line_no, path))
    if not judgements:
        raise QueryError(f"{path}: no query in the qrels file")
    return judgements


def _parse_judgement(line: str, line_no: int, path: Path) -> Judgement:
    where = f"{path} line {line_no}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise QueryError(f"{where}: invalid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise QueryError(f"{where}: a qrels line must be a JSON object")
    part = _query_part(record, path.parent, where)
    relevant = record.get("relevant")
    if not isinstance(relevant, list) or not relevant or any(isinstance(r, (dict, list)) for r in relevant):
        raise QueryError(f"{where}: 'relevant' must be a non-empty list of catalog ids")
    target = record.get("target") or ("image" if part.kind == "text" else "text")
    if target not in ("image", "text"):
        raise QueryError(f"{where}: target must be 'image' or 'text', got {target!r}")
    return Judgement(part, target, [str(r) for r in relevant], line_no)


def _query_part(record: dict, base: Path, where: str) -> QueryPart:
    given = [key for key in ("query", "text", "image") if key in record]
    if len(given) != 1 or not isinstance(record[given[0]], str) or not record[given[0]].strip():
        raise QueryError(f"{where}: needs exactly one of 'query', 'text' or 'image' (a non-empty string)")
    value = record[given[0]].strip()
    if given[0] == "text":
        return QueryPart("text", value)
    image = Path(value).expanduser()
    image = image if image.is_absolute() else base / image
    if given[0] == "image" or image.is_file():
        return QueryPart("image", str(image))
    if value.lower().endswith(IMAGE_EXTENSIONS):  # surely meant as an image: do not search its file name
        raise QueryError(f"{where}: query image not found: {image}")
    return QueryPart("text", value)


def qrels_tasks(searcher: Searcher, content: IndexContent, path: Path, directions: Sequence[str] | None,
                max_queries: int | None, progress: Progress) -> dict[str, Task]:
    by_direction: dict[str, list[Judgement]] = defaultdict(list)
    for judgement in read_qrels(path):
        if directions is None or judgement.direction in directions:
            by_direction[judgement.direction].append(judgement)
    if not by_direction:
        raise QueryError(f"{path}: no query for direction {', '.join(directions or ())}")
    tasks = {}
    for direction, judgements in by_direction.items():
        judgements = judgements[:max_queries] if max_queries else judgements
        tasks[direction] = _judgement_task(searcher, content, judgements, progress)
    return tasks


def _judgement_task(searcher: Searcher, content: IndexContent, judgements: list[Judgement],
                    progress: Progress) -> Task:
    target = judgements[0].target
    position = {content.items[item_id].key: row for row, item_id in enumerate(content.ids(target).tolist())}
    relevant, unknown = [], 0
    for judgement in judgements:
        known = {position[key] for key in judgement.relevant if key in position}
        missing = len(set(judgement.relevant)) - len(known)
        unknown += missing
        relevant.append(known | set(range(-missing, 0)))  # stand-ins that no ranking can hold
    if unknown:
        log.warning("%d relevant ids of the qrels have no %s vector in the index; they count as never found",
                    unknown, target)
    direction = judgements[0].direction
    queries = _encode_parts(searcher, [j.part for j in judgements],
                            lambda done, total: progress(f"encoding {direction} queries", done, total))
    return Task(queries, content.vectors(target), relevant)


def _encode_parts(searcher: Searcher, parts: list[QueryPart], progress: Callable[[int, int], None]) -> np.ndarray:
    chunks = []
    for start in range(0, len(parts), ENCODE_BATCH):
        vectors, _ = searcher.encode_parts(parts[start : start + ENCODE_BATCH])
        chunks.append(vectors)
        progress(min(start + ENCODE_BATCH, len(parts)), len(parts))
    return np.concatenate(chunks)


# -- Karpathy split -------------------------------------------------------------------------------
def karpathy_tasks(searcher: Searcher, content: IndexContent, path: Path, images_dir: Path | None,
                   directions: Sequence[str], progress: Progress) -> dict[str, Task]:
    unsupported = [d for d in directions if d not in DIRECTIONS]
    if unsupported:
        raise MMSearchError(f"--karpathy evaluates {' and '.join(DIRECTIONS)} only, not {', '.join(unsupported)}")
    images = load_karpathy(path)
    image_vectors = content.image_vectors[match_karpathy_images(content, images, images_dir)]
    captions = [caption for image in images for caption in image.captions]
    owner = [n for n, image in enumerate(images) for _ in image.captions]
    progress("encoding captions", 0, len(captions))
    caption_vectors = searcher.encoder.encode_texts(captions)
    progress("encoding captions", len(captions), len(captions))
    captions_of: dict[int, set[int]] = defaultdict(set)
    for row, n in enumerate(owner):
        captions_of[n].add(row)
    tasks = {"text->image": Task(caption_vectors, image_vectors, [{n} for n in owner]),
             "image->text": Task(image_vectors, caption_vectors, [captions_of[n] for n in range(len(images))])}
    return {direction: tasks[direction] for direction in directions}


def match_karpathy_images(content: IndexContent, images: list[KarpathyImage], images_dir: Path | None) -> list[int]:
    """Image-vector positions of the test images: by relative path (key, or path under images_dir),
    else by file name when exactly one indexed image has it."""
    by_path: dict[str, int] = {}
    by_name: dict[str, list[int]] = defaultdict(list)
    for position, item_id in enumerate(content.image_ids.tolist()):
        item = content.items[item_id]
        by_path.setdefault(item.key, position)
        relative = _relative_to(item.image, images_dir)
        if relative:
            by_path[relative] = position
        by_name[Path(item.image or item.key).name].append(position)
    positions, missing = [], []
    for image in images:
        position = by_path.get(image.relative_path)
        named = by_name.get(image.filename, [])
        if position is None and len(named) == 1:
            position = named[0]
        if position is None:
            missing.append(image.relative_path)
        positions.append(position)
    if missing:
        raise MMSearchError(f"the index lacks {len(missing)} of the {len(images)} Karpathy test images "
                            f"(matched by file name), e.g. {', '.join(missing[:3])}; index them first")
    return positions


def _relative_to(image: str | None, root: Path | None) -> str | None:
    if not image or root is None:
        return None
    for base in (root.absolute(), root.resolve()):
        try:
            return Path(image).relative_to(base).as_posix()
        except ValueError:
            continue
    return None


# -- output ---------------------------------------------------------------------------------------
def directions_of(result: dict) -> list[str]:
    return [key for key, value in result.items() if isinstance(value, dict)]


def format_table(result: dict) -> str:
    """Directions as rows, metrics as columns (fractions in [0, 1]), then the protocol."""
    directions = directions_of(result)
    metrics = [key for key in result[directions[0]] if key not in ("curve", "queries")]
    header = ["direction", *metrics, "queries"]
    rows = [[d, *(f"{result[d][m]:.4f}" for m in metrics), str(result[d]["queries"])] for d in directions]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))])
             for row in [header, *rows]]
    return "\n".join([*lines, f"protocol: {result['protocol']}", f"index: {result['index']}"])


def plot_recall_curves(result: dict, path: Path) -> Path:
    """Recall@K (hit rate) for K = 1..max k, one line per direction, written as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise MMSearchError("--plot needs matplotlib: pip install 'mmsearch[plot]'") from exc
    figure, axes = plt.subplots(figsize=(6, 4))
    try:
        for direction in directions_of(result):
            curve = {int(k): value for k, value in result[direction]["curve"].items()}  # JSON made keys str
            ranks = sorted(curve)
            axes.plot(ranks, [100 * curve[k] for k in ranks], marker="o", label=direction)
        axes.set(xlabel="K", ylabel="Recall@K (%)", ylim=(0, 102), title=f"Recall@K of {Path(result['index']).name}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise MMSearchError(f"cannot write plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
    return path
