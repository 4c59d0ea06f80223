"""Thin click commands over the library: parse, call one library function, print."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from .config import PRECISIONS
from .errors import MMSearchError

# OpenMP threads that spin after each parallel region steal the cores that decode images during
# `index` (measured: pipeline / bare encoder 0.85 spinning, 0.92 passive) and cost nothing measurable
# on ViT-sized ops. libgomp reads this once, when torch is first imported (always later, lazily, here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

INDEX_HELP = "Index name (under ./indexes or $MMSEARCH_HOME) or a path containing '/'."
FORMATS = click.Choice(["table", "json"])


def _index_dir(name: str) -> Path:
    from .config import resolve_index_dir

    return resolve_index_dir(name)


def _run(fn, *args, **kwargs):
    """Call the library; turn its typed errors into one clear line and a non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except MMSearchError as exc:
        raise click.ClickException(str(exc)) from exc


class _Bar:
    """tqdm progress on stderr, one bar per stage; silent with -q."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, unit="item", mininterval=0.2)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="mmsearch")
def cli(verbose: int) -> None:
    """Multimodal semantic search for product catalogs (open_clip + FAISS + SQLite)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmsearch").setLevel(level)  # our warnings show even when the root is quietened
    if verbose == 0:
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs routine info as root warnings


@cli.command("index")
@click.argument("catalog", type=click.Path(exists=True, path_type=Path))
@click.option("--index", "index_name", required=True, help=INDEX_HELP)
@click.option("--model", help="open_clip name, 'hf-hub:ORG/NAME', a model directory or a shipped model "
              "(default for a new index: ViT-B-32 laion2b_s34b_b79k; an existing index keeps its model).")
@click.option("--pretrained", help="Weights: a tag, a local .safetensors/.pt file, or 'random' (tests only).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0,
              help="Decode and hashing threads (0 = one per core). When ONNX Runtime encodes, images are "
                   "decoded on the encoder's streams (one per core) and these threads only hash.")
@click.option("--delete/--no-delete", default=True, show_default=True,
              help="Remove indexed items that are no longer in the catalog.")
@click.option("--index-type", type=click.Choice(["auto", "flat", "hnsw", "ivfpq"]),
              help="FAISS index type. Default: what the index was last built with (its --index-type or "
                   "`reindex`), auto for a new index.")
@click.option("--max-memory", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Memory budget in MiB for the automatic index choice.")
@click.option("--wait", is_flag=True, help="Wait for another ingest on this index instead of failing.")
@click.option("--runtime", type=click.Choice(["auto", "onnx", "torch"]), default="auto", show_default=True,
              help="Where the image tower runs. auto: ONNX Runtime (exported and checked against torch once per "
                   "model, the same vectors, faster on CPU), or PyTorch with a warning for a model that does "
                   "not export; onnx: ONNX Runtime or an error; torch: always PyTorch.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Encode images with a dynamic int8 tower (in "
              "ONNX Runtime, captions too): faster on CPU (most in ONNX Runtime), vectors move slightly "
              "(see benchmarks/README.md).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def index_cmd(catalog, index_name, model, pretrained, batch_size, workers, delete, index_type, max_memory,
              wait, runtime, quantize, fmt, quiet):
    """Encode a catalog (CSV, JSONL or a folder of images) into an index; re-run to update it.

    \b
    mmsearch index catalog.csv --index shop
    mmsearch index photos/ --index photos --model ViT-B-32 --pretrained ./vit-b-32.safetensors
    mmsearch index catalog.csv --index shop --quantize int8
    """
    from .ingest import IngestOptions, ingest

    options = IngestOptions(model=model, pretrained=pretrained, batch_size=batch_size, workers=workers,
                            delete=delete, index_type=index_type, max_memory=max_memory * 1024**2,
                            wait_for_lock=wait, quantize=quantize, runtime=runtime)
    bar = _Bar(quiet)
    try:
        report = _run(ingest, catalog, _index_dir(index_name), options, progress=bar)
    finally:
        bar.close()
    if fmt == "json":
        click.echo(json.dumps(report.to_dict()))
        return
    click.echo(f"added {report.added}, updated {report.updated}, removed {report.removed}, "
               f"unchanged {report.unchanged}, failed {len(report.failed)}")
    if report.index_updated:
        click.echo(f"FAISS files updated in place, not rebuilt: {', '.join(report.index_updated)}")
    if report.images_encoded:
        click.echo(f"images encoded: {report.images_encoded} ({report.image_runtime})")
    for err in report.failed:
        click.echo(f"  skipped {err.item}: {err.reason}", err=True)


@cli.command("search")
@click.argument("text", required=False)
@click.option("--index", "index_name", required=True, help=INDEX_HELP)
@click.option("--image", "images", multiple=True, help="Query image (repeatable; 'W:path' sets a weight).")
@click.option("--text", "texts", multiple=True, help="More query words (repeatable; '-1:striped' = negative).")
@click.option("--target", type=click.Choice(["image", "text", "item"]),
              help="What to rank: item images, captions, or items by both (default: image; item for composed).")
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--fusion", type=click.Choice(["attention", "sum"]), help="How query parts and modalities combine.")
@click.option("--where", multiple=True, help="Metadata filter: FIELD=V, FIELD<N, >, <=, >=, !=, FIELD~TEXT.")
@click.option("--min-score", type=float, help="Drop hits scoring below this.")
@click.option("--explain", is_flag=True, help="Show each part's contribution and the image/caption attention.")
@click.option("--queries", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Batch mode: a JSONL file of queries; prints one JSON line per query.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def search_cmd(text, index_name, images, texts, target, k, fusion, where, min_score, explain, queries, fmt):
    """Search an index by words, pictures, or both.

    \b
    mmsearch search "red leather ankle boot" --index shop
    mmsearch search --image query.jpg --target text --index shop
    mmsearch search --image dress.jpg --text red --text "-1:striped" --index shop --explain
    mmsearch search sneaker --where category=Shoes --where "price<50" --index shop
    """
    from .search import Searcher, build_query

    searcher = _run(Searcher, _index_dir(index_name))
    with searcher:
        if queries:
            _run(_batch, searcher, queries)
            return
        query = _run(build_query, texts=([text] if text else []) + list(texts), images=images, target=target,
                     k=k, fusion_name=fusion, where=where, explain=explain, min_score=min_score)
        result = _run(searcher.search, query)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict()))
    else:
        _print_hits(result)


def _batch(searcher, path: Path) -> None:
    from .errors import QueryError
    from .search import query_from_json

    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            query = query_from_json(json.loads(line))
            click.echo(json.dumps(searcher.search(query).to_dict()))
        except (QueryError, ValueError) as exc:
            click.echo(json.dumps({"line": line_no, "error": str(exc)}))


def _print_hits(result) -> None:
    if result.match and result.match.get("no_good_match"):
        click.echo("note: no good match (the best score is close to what random items score)", err=True)
    if not result.results:
        click.echo("no results")
        return
    for rank, hit in enumerate(result.results, start=1):
        label = hit.caption or ""
        where = hit.image or ""
        click.echo(f"{rank:>3}  {hit.score:7.4f}  {hit.id}  {label}  {where}".rstrip())
        if hit.explain:
            for part in hit.explain["parts"]:
                att = part["modality_attention"]
                click.echo(f"       {part['contribution']:+.4f} from {part['part']} "
                           f"(image {_pct(att.get('image'))}, caption {_pct(att.get('caption'))})")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


@cli.command("info")
@click.option("--index", "index_name", required=True, help=INDEX_HELP)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def info_cmd(index_name, fmt):
    """Show what an index holds and which model built it.

    \b
    mmsearch info --index shop
    """
    from .info import index_info

    info = _run(index_info, _index_dir(index_name))
    if fmt == "json":
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        click.echo(f"{key:>14}: {value}")


def _parse_ks(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"expected positive ranks separated by commas, like 1,5,10; got {value!r}")
    return ks


@cli.command("evaluate")
@click.option("--index", "index_name", required=True, help=INDEX_HELP)
@click.option("--relevant-by", metavar="FIELD", help="Labels from the catalog: items sharing this metadata "
              "value (e.g. category) are relevant to each other.")
@click.option("--qrels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL judgements: {"query": TEXT or IMAGE, "relevant": [ids]} per line (optional "target").')
@click.option("--karpathy", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Flickr30k / COCO Karpathy split JSON: the standard 5-captions-per-image test protocol.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image folder of --karpathy (matches indexed images by their path under it).")
@click.option("-k", "--ks", default="1,5,10", show_default=True, callback=_parse_ks,
              help="Ranks for R@K; P, mAP and nDCG are cut at the largest.")
@click.option("--max-queries", type=click.IntRange(min=1), help="Only the first N queries of each direction.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write Recall@K curves to this PNG.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def evaluate_cmd(index_name, relevant_by, qrels, karpathy, images_dir, ks, max_queries, fmt, plot, quiet):
    """Measure retrieval quality (R@K, P, mAP, nDCG, MRR) of an index on labelled queries.

    Ranking is exact (every stored vector is scored), for text->image and image->text.

    \b
    mmsearch evaluate --index shop --relevant-by category
    mmsearch evaluate --index shop --qrels judged.jsonl --format json
    mmsearch evaluate --index flickr --karpathy dataset_flickr30k.json --images flickr30k-images --plot r.png
    """
    from .evaluate import evaluate_index, format_table, plot_recall_curves

    bar = _Bar(quiet)
    try:
        result = _run(evaluate_index, _index_dir(index_name), relevant_by=relevant_by, qrels=qrels,
                      karpathy=karpathy, karpathy_images=images_dir, ks=ks, max_queries=max_queries,
                      progress=bar)
    finally:
        bar.close()
    click.echo(json.dumps(result) if fmt == "json" else format_table(result))
    if plot:
        _run(plot_recall_curves, result, plot)
        if not quiet:
            click.echo(f"wrote {plot}", err=True)


@cli.command("serve")
@click.option("--index", "index_name", required=True, help=INDEX_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 exposes the server to your network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
def serve_cmd(index_name, host, port):
    """Serve the HTTP API and the search web page for one index.

    \b
    mmsearch serve --index shop              # http://127.0.0.1:8000, API docs at /docs
    mmsearch serve --index shop --host 0.0.0.0 --port 9000
    """
    try:  # optional dependencies: only the server needs them
        import uvicorn

        from .server import create_app
    except ImportError as exc:
        raise click.ClickException(f"the server needs the 'server' extra ({exc.name} is missing): "
                                   "pip install 'mmsearch[server]'") from exc
    app = _run(create_app, _index_dir(index_name))  # loads the model and index before listening
    click.echo(f"mmsearch: serving {index_name} at http://{host}:{port} (API docs: /docs)", err=True)
    uvicorn.run(app, host=host, port=port)


@cli.command("tune")
@click.option("--index", "index_name", required=True, help=INDEX_HELP)
@click.option("--queries", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help='JSONL of labelled queries: batch-query lines plus "relevant": [ids].')
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Fit for hit rate at k.")
@click.option("--dry-run", is_flag=True, help="Report the fitted values without saving them.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def tune_cmd(index_name, queries, k, dry_run, fmt):
    """Fit fusion temperatures and modality weights on labelled queries; save them in the index.

    \b
    mmsearch tune --index shop --queries composed.jsonl
    """
    from .tune import tune_index

    report = _run(tune_index, _index_dir(index_name), queries, k=k, save=not dry_run)
    if fmt == "json":
        click.echo(json.dumps(report))
        return
    params = report["attention"]["params"]
    click.echo(f"{report['queries']} queries; R@{k}: attention {report['attention'][f'R@{k}']:.4f} "
               f"(before tuning {report['before'][f'R@{k}']:.4f}), sum {report['sum'][f'R@{k}']:.4f}")
    click.echo(f"fitted: modality_tau={params['modality_tau']} part_tau={params['part_tau']} "
               f"image_weight={params['image_weight']} text_weight={params['text_weight']}; "
               f"default fusion: {report['chosen']}" + (" (not saved)" if dry_run else " (saved)"))


@cli.command("train")
@click.argument("catalog", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output model directory (loadable with --model DIR).")
@click.option("--model", default="mmsearch-fashion-tiny", show_default=True,
              help="Start from any model `index` can load, or a packaged config (from scratch).")
@click.option("--pretrained", help="Weights for --model (tag or file); omit to train a packaged config from scratch.")
@click.option("--epochs", type=click.IntRange(min=1), help="Stop after this many epochs.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="Stop after this much training time.")
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 0.5), default=0.05, show_default=True)
@click.option("--freeze", type=click.Choice(["image", "text"]), help="Freeze a whole tower.")
@click.option("--train-last-blocks", type=click.IntRange(min=0), help="Train only the last N blocks of each tower.")
@click.option("--group-column", help="Metadata column naming the product: its variants become image-image positives.")
@click.option("--no-augment", is_flag=True, help="No image augmentation.")
@click.option("--flip-only", is_flag=True, help="Image augmentation is horizontal flips only (small images).")
@click.option("--no-caption-templates", is_flag=True, help="No caption paraphrasing.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="bf16 CPU autocast of both towers or of the image tower only (faster on AMX CPUs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_cmd(catalog, out, model, pretrained, epochs, minutes, batch_size, lr, warmup_steps, val_fraction, freeze,
              train_last_blocks, group_column, no_augment, flip_only, no_caption_templates, precision, seed, resume,
              fmt, quiet):
    """Fine-tune (or train from scratch) on a catalog's image-caption pairs with a contrastive loss.

    \b
    mmsearch train catalog.csv --model ViT-B-32 --pretrained laion2b_s34b_b79k --out models/shop-ft --epochs 3
    mmsearch train catalog.csv --model mmsearch-fashion-tiny --out models/fm --minutes 10
    mmsearch index catalog.csv --index shop --model models/fm
    """
    from .train import TrainOptions, train

    if epochs is None and minutes is None:
        raise click.UsageError("give --epochs or --minutes (or both)")
    options = TrainOptions(model=model, pretrained=pretrained, epochs=epochs, minutes=minutes, batch_size=batch_size,
                           lr=lr, warmup_steps=warmup_steps, val_fraction=val_fraction, freeze=freeze,
                           train_last_blocks=train_last_blocks, group_column=group_column, augment=not no_augment,
                           flip_only=flip_only, caption_templates=not no_caption_templates, precision=precision,
                           seed=seed, resume=resume)
    bar = _TrainBar(quiet)
    try:
        report = _run(train, catalog, out, options, progress=bar)
    finally:
        bar.close()
    if fmt == "json":
        click.echo(json.dumps(report, default=str))
        return
    click.echo(f"model written to {out}")
    for key in ("steps", "epochs", "minutes", "final_loss"):
        if key in report:
            click.echo(f"{key:>12}: {report[key]}")
    for key, value in (report.get("val") or {}).items():
        click.echo(f"{key:>12}: {value}")


class _TrainBar:
    """One tqdm bar over training steps showing the loss; silent with -q."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if event.get("event") == "validation":
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in (event.get("val") or {}).items() if isinstance(v, float))
            tqdm.write(f"step {event['step']}: validation {metrics}", file=sys.stderr)
            return
        if event.get("event") != "step":
            return
        if self.bar is None:
            self.bar = tqdm(desc="training", unit="step", file=sys.stderr, total=event.get("total_steps"))
        self.bar.update(event["step"] - self.bar.n)
        self.bar.set_postfix({"loss": f"{event['loss']:.4f}", "epoch": f"{event['epoch']:.2f}"}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@cli.command("reindex")
@click.option("--index", "index_name", required=True, help=INDEX_HELP)
@click.option("--index-type", type=click.Choice(["auto", "flat", "hnsw", "ivfpq"]), default="auto",
              show_default=True)
@click.option("--max-memory", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Memory budget in MiB for the automatic index choice.")
@click.option("--wait", is_flag=True, help="Wait for another writer on this index instead of failing.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def reindex_cmd(index_name, index_type, max_memory, wait, fmt):
    """Rebuild the ANN index from the stored vectors (no re-encoding), e.g. as another index type.

    \b
    mmsearch reindex --index shop --index-type hnsw
    """
    from .reindex import reindex

    result = _run(reindex, _index_dir(index_name), index_type, max_memory * 1024**2, wait)
    if fmt == "json":
        click.echo(json.dumps(result))
        return
    params = result["index"]
    knobs = ", ".join(f"{k}={params[k]}" for k in ("ef_search", "nprobe") if params.get(k))
    click.echo(f"rebuilt {result['items']} items as {params['index_type']}"
               + (f" ({knobs}, recall@10 {params['measured_recall_at_10']})" if knobs else ""))


def main() -> None:
    cli(prog_name="mmsearch")


if __name__ == "__main__":
    main()
