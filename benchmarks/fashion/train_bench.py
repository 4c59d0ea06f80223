"""Train a small model on the Fashion-MNIST colour catalog and measure colour x category retrieval.

    python -m benchmarks.fashion.train_bench --minutes 15 --out benchmarks/out/fashion/run1
    python -m benchmarks.fashion.train_bench --limit 2000 --minutes 1 --out /tmp/quick   # smoke test

Builds the train catalog (60,000 photos, or --limit) and the test gallery (10,000 photos, one random
colour each) under --data, trains with `mmsearch.train.train` within --minutes of wall-clock time,
and keeps a snapshot of the weights at every epoch. After training, each snapshot is evaluated on
the test gallery (exact numpy search, no index), so evaluation never eats into the training time:

* text->image P@10: every colour x category caption queries the gallery; a hit is an item of that
  colour AND category; also split into category-only and colour-only hits;
* image->text top-1: each gallery image picks one of the 110 captions; right when both are right
  (and the same split);
* paraphrased queries that are never catalog captions, in two families: paraphrases the training
  augmentation can produce ("ankle boots in red", "a red boot", "crimson ankle boot") and templates
  it never produces ("red ankle boot for sale", "show me red ankle boots"), P@10 (both right).

Writes OUT/curve.csv and OUT/curve.png (metrics vs training minutes) and OUT/results.json;
--ship DIR saves the final model as a shipped model directory (<= 30 MB).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.fashion.make_catalog import CAPTION_NOUNS, CATEGORIES, COLORS, build_catalog, caption_for
from mmsearch.config import PRECISIONS

DEFAULT_DATA = Path("benchmarks/out/fashion/data")
SHIP_LIMIT_BYTES = 30 * 1024 * 1024
HEAD_NOUNS = {"ankle boot": "boot", "trouser": "trousers"}  # what a shopper shortens the category to
PLURALS = {"trouser": "trousers", "dress": "dresses"}
IN_SPACE = ("{p} in {c}", "{a} {c} {head}", "{syn} {n}")  # forms the training augmentation produces
HELD_OUT = ("{c} {n} for sale", "show me {c} {p}", "{n} in the colour {c}")  # forms it never produces
SYNONYM = {"red": "crimson", "orange": "tangerine", "yellow": "mustard", "green": "emerald", "blue": "navy",
           "purple": "violet", "pink": "rose", "brown": "chocolate", "black": "ebony", "white": "ivory",
           "grey": "charcoal"}


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(root: Path, limit: int | None, colors_per_item: int, seed: int) -> tuple[Path, Path]:
    """Build (or reuse) the train catalog and the test gallery; returns their CSV paths."""
    train_dir = root / f"train-{limit or 'all'}-c{colors_per_item}-s{seed}"
    test_dir = root / f"test-all-c1-s{seed + 1}"
    for split, folder, count, colours, split_seed in (
        ("train", train_dir, limit, colors_per_item, seed),
        ("test", test_dir, None, 1, seed + 1),
    ):
        if not (folder / "catalog.csv").is_file():
            started = time.monotonic()
            build_catalog(split, folder, seed=split_seed, limit=count, colors_per_item=colours)
            print(f"built {folder} in {time.monotonic() - started:.0f} s", flush=True)
    return train_dir / "catalog.csv", test_dir / "catalog.csv"


# ---------------------------------------------------------------------------------------------
# Queries


def _noun(category: str) -> str:
    return CAPTION_NOUNS.get(category, category)


def _plural(category: str) -> str:
    return PLURALS.get(category, category + "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_queries() -> list[tuple[str, str, str]]:
    """(query, colour, category) for every colour x category catalog caption."""
    return [(caption_for(category, colour), colour, category) for category in CATEGORIES for colour in COLORS]


def paraphrase_queries(templates: Sequence[str]) -> list[tuple[str, str, str]]:
    queries = []
    for category in CATEGORIES:
        for colour in COLORS:
            fields = {"c": colour, "n": _noun(category), "p": _plural(category), "a": _article(colour),
                      "head": HEAD_NOUNS.get(category, category), "syn": SYNONYM[colour]}
            queries.extend((template.format(**fields), colour, category) for template in templates)
    return queries


# ---------------------------------------------------------------------------------------------
# Evaluation on the test gallery


class Gallery:
    """Test gallery images decoded once; encoded again for each model evaluated."""

    def __init__(self, csv_path: Path):
        from mmsearch.catalog import read_catalog
        from mmsearch.images import load_image

        items = read_catalog(csv_path).items
        self.images = [load_image(item.image, item.key) for item in items]
        self.colours = np.array([item.metadata["color"] for item in items])
        self.categories = np.array([item.metadata["category"] for item in items])

    def evaluate(self, model_dir: Path) -> dict:
        from mmsearch.encoders import load_encoder

        encoder = load_encoder(str(model_dir))
        images = encoder.encode_images(self.images, batch_size=500)
        metrics = self.text_to_image(encoder, images, caption_queries(), "t2i")
        metrics.update(self.image_to_text(encoder, images))
        for family, templates in (("para_in_space", IN_SPACE), ("para_held_out", HELD_OUT)):
            found = self.text_to_image(encoder, images, paraphrase_queries(templates), family)
            metrics[f"{family}_P@10"] = found[f"{family}_P@10"]
        return metrics

    def text_to_image(self, encoder, images: np.ndarray, queries, name: str, k: int = 10) -> dict:
        texts = encoder.encode_texts([q for q, _, _ in queries])
        top = np.argsort(-(texts @ images.T), axis=1)[:, :k]
        colour_ok = self.colours[top] == np.array([c for _, c, _ in queries])[:, None]
        category_ok = self.categories[top] == np.array([k for _, _, k in queries])[:, None]
        return {f"{name}_P@10": float((colour_ok & category_ok).mean()),
                f"{name}_P@10_category": float(category_ok.mean()),
                f"{name}_P@10_colour": float(colour_ok.mean())}

    def image_to_text(self, encoder, images: np.ndarray) -> dict:
        queries = caption_queries()
        best = (images @ encoder.encode_texts([q for q, _, _ in queries]).T).argmax(axis=1)
        colour_ok = np.array([c for _, c, _ in queries])[best] == self.colours
        category_ok = np.array([k for _, _, k in queries])[best] == self.categories
        return {"i2t_top1": float((colour_ok & category_ok).mean()),
                "i2t_top1_category": float(category_ok.mean()), "i2t_top1_colour": float(colour_ok.mean())}


# ---------------------------------------------------------------------------------------------
# Training with per-epoch snapshots


class Recorder:
    """Progress callback: prints validation lines and copies each checkpoint's weights aside."""

    def __init__(self, snapshot_root: Path, log_every: int = 50):
        self.root = snapshot_root
        self.log_every = log_every
        self.snapshots: list[dict] = []
        self.cpu_start: float | None = None
        self.last_val: dict = {}

    def cpu_minutes(self) -> float:
        return (time.process_time() - self.cpu_start) / 60.0 if self.cpu_start is not None else 0.0

    def __call__(self, event: dict) -> None:
        if self.cpu_start is None:
            self.cpu_start = time.process_time()
        kind = event["event"]
        if kind == "step" and event["step"] % self.log_every == 0:
            print(f"step {event['step']} epoch {event['epoch']:.2f} loss {event['loss']:.4f} lr {event['lr']:.2e} "
                  f"scale {event['logit_scale']:.1f} {event['minutes']:.2f} min", flush=True)
        elif kind == "validation":
            self.last_val = event["val"]
            shown = " ".join(f"{k} {v:.4f}" for k, v in event["val"].items() if isinstance(v, float))
            print(f"validation step {event['step']} epoch {event['epoch']:.2f}: {shown}", flush=True)
        elif kind == "checkpoint":
            self.snapshot(event)

    def snapshot(self, event: dict) -> None:
        from mmsearch.encoders import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE

        target = self.root / f"step-{event['step']:06d}"
        target.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE):
            shutil.copy2(Path(event["path"]) / name, target / name)
        self.snapshots.append({"dir": str(target), "step": event["step"], "epoch": round(event["epoch"], 3),
                               "minutes": round(event["minutes"], 3), "cpu_minutes": round(self.cpu_minutes(), 3),
                               **{f"val_{k}": v for k, v in self.last_val.items()}})


def evaluate_snapshots(gallery: Gallery, snapshots: list[dict]) -> list[dict]:
    rows = []
    for snap in snapshots:
        metrics = gallery.evaluate(Path(snap["dir"]))
        rows.append({**snap, **metrics})
        print(format_metrics(f"test @ epoch {snap['epoch']} ({snap['minutes']:.1f} min)", metrics), flush=True)
    return rows


def format_metrics(title: str, m: dict) -> str:
    return (f"{title}: t2i P@10 {m['t2i_P@10']:.4f} (category {m['t2i_P@10_category']:.4f}, colour "
            f"{m['t2i_P@10_colour']:.4f}) | i2t top-1 {m['i2t_top1']:.4f} (category {m['i2t_top1_category']:.4f}, "
            f"colour {m['i2t_top1_colour']:.4f}) | paraphrases P@10: in-space {m['para_in_space_P@10']:.4f}, "
            f"held-out {m['para_held_out_P@10']:.4f}")


def write_curve(rows: list[dict], out: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "dir"))
    with (out / "curve.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    minutes = [row["minutes"] for row in rows]
    for key in ("t2i_P@10", "i2t_top1", "i2t_top1_category", "para_in_space_P@10", "para_held_out_P@10"):
        ax.plot(minutes, [row[key] for row in rows], marker="o", label=key)
    ax.set_xlabel("training minutes (2-core CPU, wall clock)")
    ax.set_ylabel("test gallery metric")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)


def ship(model_dir: Path, dest: Path, card: dict) -> Path:
    """Save as a shipped model; weights go to fp16 when fp32 would exceed the size limit."""
    from mmsearch.encoders import MODEL_WEIGHTS_FILE, load_encoder, save_model_dir

    model = load_encoder(str(model_dir)).model
    data = Path(card.get("data", ""))
    if data.is_absolute() and data.is_relative_to(Path.cwd()):  # the card ships: no path of this machine
        card = {**card, "data": str(data.relative_to(Path.cwd()))}
    if sum(p.numel() * 4 for p in model.state_dict().values()) > SHIP_LIMIT_BYTES:
        model = model.half()  # loading copies fp16 weights into the fp32 model
        card = {**card, "weights_dtype": "float16"}
    if dest.exists():
        shutil.rmtree(dest)
    save_model_dir(model, str(model_dir), dest, card)
    size = (dest / MODEL_WEIGHTS_FILE).stat().st_size
    if size > SHIP_LIMIT_BYTES:
        raise SystemExit(f"{dest}: weights are {size / 2**20:.1f} MB, over the 30 MB limit")
    return dest


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder: model, snapshots, curve, results")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="catalog cache (default: %(default)s)")
    parser.add_argument("--model", default="mmsearch-fashion-tiny")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N photos only")
    parser.add_argument("--colors-per-item", type=int, default=1, help="colour variants per training photo")
    parser.add_argument("--group", action="store_true", help="variants of a photo are image-image positives")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--flip-only", action="store_true", help="augmentation: horizontal flips only")
    parser.add_argument("--no-caption-templates", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument("--final-only", action="store_true", help="test only the final model, not every epoch")
    parser.add_argument("--ship", type=Path, default=None, help="also save the final model here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting for a core make training many times slower on a shared
    # machine; libgomp reads this when torch is first imported, which happens below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mmsearch.train import TrainOptions, train

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = prepare_data(args.data, args.limit, args.colors_per_item, args.seed)
    options = TrainOptions(
        model=args.model, epochs=args.epochs, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, seed=args.seed,
        augment=not args.no_augment, flip_only=args.flip_only, caption_templates=not args.no_caption_templates,
        group_column="product" if args.group else None, workers=args.workers, precision=args.precision)
    recorder = Recorder(args.out / "snapshots")
    started = time.monotonic()
    report = train(train_csv, args.out / "model", options, recorder)
    print(f"trained {report['steps']} steps, {report['epochs']:.2f} epochs in {report['minutes']:.2f} min "
          f"(run incl. data decoding {(time.monotonic() - started) / 60:.2f} min)", flush=True)
    snapshots = recorder.snapshots[-1:] if args.final_only else recorder.snapshots
    rows = evaluate_snapshots(Gallery(test_csv), snapshots)
    write_curve(rows, args.out)
    final = rows[-1]
    results = {"options": asdict(options), "argv": sys.argv[1:], "steps": report["steps"], "epochs": report["epochs"],
               "minutes": report["minutes"], "cpu_minutes": final["cpu_minutes"], "final_loss": report["final_loss"],
               "val": report["val"], "test": {k: v for k, v in final.items() if k not in ("dir",)}, "curve": rows}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_metrics("FINAL test", final), flush=True)
    if args.ship:
        card = json.loads((args.out / "model" / "model_card.json").read_text())
        ship(args.out / "model", args.ship, {**card, "benchmark": results["test"]})
        print(f"shipped to {args.ship}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
