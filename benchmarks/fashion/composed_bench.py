"""Composed retrieval on the coloured Fashion-MNIST gallery.

A gallery holds each test product in several colours. A query is one product photo in colour A plus
the words for colour B; the target is the same product in colour B. Reported: R@1 and R@10 for
image-only, text-only, `sum` and `attention` fusion, with the temperatures fitted by `mmsearch tune`
on a separate set of queries (products disjoint from the test queries).

    python -m benchmarks.fashion.composed_bench --model mmsearch-fashion --out benchmarks/out/composed
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.fashion.make_catalog import build_catalog
from mmsearch.ingest import IngestOptions, ingest
from mmsearch.search import Query, QueryPart, Searcher
from mmsearch.tune import tune_index

MODES = ("image-only", "text-only", "sum", "attention")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mmsearch-fashion")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--products", type=int, default=1000, help="test products in the gallery")
    parser.add_argument("--colors-per-item", type=int, default=4)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--tune-queries", type=int, default=200)
    parser.add_argument("--text", default="{color}", help="words for colour B ({color}, {category})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/composed"))
    return parser.parse_args(argv)


def make_queries(catalog: Path, n_tune: int, n_test: int, text: str, seed: int):
    """(tune, test) lists of (query image, words, target id); tune and test use disjoint products."""
    variants = defaultdict(list)
    with open(catalog, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            variants[row["product"]].append(row)
    rng = np.random.default_rng(seed)
    products = [p for p in variants if len(variants[p]) >= 2]
    rng.shuffle(products)
    queries = []
    for product in products[: n_tune + n_test]:
        a, b = rng.choice(len(variants[product]), size=2, replace=False)
        source, target = variants[product][a], variants[product][b]
        words = text.format(color=target["color"], category=target["category"])
        queries.append((str((catalog.parent / source["image"]).resolve()), words, target["id"]))
    return queries[:n_tune], queries[n_tune:]


def write_labelled(path: Path, queries) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for image, words, target in queries:
            fh.write(json.dumps({"parts": [{"image": image}, {"text": words}], "target": "item",
                                 "relevant": [target]}) + "\n")
    return path


def mode_query(mode: str, image: str, words: str) -> Query:
    if mode == "image-only":
        return Query(parts=[QueryPart("image", image)], target="image", k=10)
    if mode == "text-only":
        return Query(parts=[QueryPart("text", words)], target="item", k=10)
    return Query(parts=[QueryPart("image", image), QueryPart("text", words)], target="item", k=10, fusion=mode)


def evaluate(index: Path, queries) -> dict:
    results = {}
    with Searcher(index) as searcher:
        for mode in MODES:
            ranks = []
            for image, words, target in queries:
                ids = [h.id for h in searcher.search(mode_query(mode, image, words)).results]
                ranks.append(ids.index(target) + 1 if target in ids else None)
            results[mode] = {"R@1": float(np.mean([r == 1 for r in ranks])),
                             "R@10": float(np.mean([r is not None for r in ranks]))}
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    catalog = build_catalog(split="test", out=args.out / "gallery", seed=args.seed, limit=args.products,
                            colors_per_item=args.colors_per_item)
    index = args.out / "index"
    report = ingest(catalog, index, IngestOptions(model=args.model, pretrained=args.pretrained))
    print(f"gallery: {report.added + report.unchanged} items ({args.products} products x "
          f"{args.colors_per_item} colours), {len(report.failed)} failed", file=sys.stderr)
    tune_queries, test_queries = make_queries(catalog, args.tune_queries, args.queries, args.text, args.seed)
    fitted = tune_index(index, write_labelled(args.out / "tune.jsonl", tune_queries), k=10)
    write_labelled(args.out / "test.jsonl", test_queries)
    results = evaluate(index, test_queries)
    summary = {"model": args.model, "gallery_items": report.added + report.unchanged,
               "test_queries": len(test_queries), "tune_queries": len(tune_queries),
               "fitted": fitted["attention"]["params"], "results": results,
               "minutes": round((time.perf_counter() - started) / 60, 2)}
    (args.out / "composed_results.json").write_text(json.dumps(summary, indent=2))
    print(f"{'mode':<12} {'R@1':>6} {'R@10':>6}")
    for mode, row in results.items():
        print(f"{mode:<12} {row['R@1']:>6.3f} {row['R@10']:>6.3f}")
    params = summary["fitted"]
    print(f"fitted: modality_tau={params['modality_tau']} part_tau={params['part_tau']} "
          f"image_weight={params['image_weight']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
