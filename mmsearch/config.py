"""Constants, typed config, index location and the per-index manifest.json."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import IndexNotFoundError, SchemaError

SCHEMA_VERSION = 1  # bump with an entry in store.UPGRADES when the on-disk layout changes
MANIFEST_NAME = "manifest.json"
DB_NAME = "items.sqlite"
LOCK_NAME = ".write.lock"
DEFAULT_INDEXES_DIR = "indexes"
HOME_ENV = "MMSEARCH_HOME"
# A real pretrained model for real users: good published retrieval for its speed (see README).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
MODALITIES = ("image", "text")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as decompression bombs
# Training precision (bf16 = CPU autocast). "bf16-image" halves a small conv tower's step on
# AMX/AVX512-BF16 CPUs, while a narrow text transformer runs slower in bf16 (the casts outweigh its
# tiny matmuls), so it keeps the text tower in fp32.
PRECISIONS = ("fp32", "bf16", "bf16-image")
PACKAGE_DIR = Path(__file__).parent
SHIPPED_MODELS_DIR = PACKAGE_DIR / "models"  # models shipped inside the package, by name


def resolve_index_dir(name: str) -> Path:
    """`--index shop` -> ./indexes/shop (or $MMSEARCH_HOME/shop); a value with '/' is a path."""
    if "/" in name or os.sep in name:
        return Path(name).expanduser().resolve()
    root = os.environ.get(HOME_ENV) or DEFAULT_INDEXES_DIR
    return (Path(root).expanduser() / name).resolve()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; an index should be readable like its other files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@dataclass
class ModelRef:
    """Which encoder built an index; enough to load it again."""

    name: str  # open_clip zoo name, packaged config, 'hf-hub:org/repo' or a model directory
    pretrained: str | None = None  # tag, checkpoint path, 'random' (tests only) or None

    def label(self) -> str:
        return f"{self.name}:{self.pretrained}" if self.pretrained else self.name


@dataclass
class FusionConfig:
    """Query-time scoring knobs; `mmsearch tune` fits them and stores them here."""

    strategy: str = "attention"  # 'attention' or 'sum'
    modality_tau: float = 0.05  # softmax temperature over an item's image/caption similarities
    part_tau: float = -0.1  # temperature over query parts; negative = soft-AND (worst part weighs most)
    image_weight: float = 1.0  # prior weight of an item's image vector in the modality softmax
    text_weight: float = 1.0  # prior weight of an item's caption vector
    candidates: int = 256  # K': FAISS candidates per query part and modality before exact re-scoring


@dataclass
class IndexParams:
    """ANN index choice and the search parameters measured to reach the recall target."""

    index_type: str = "flat"  # flat | hnsw | ivfpq
    requested: str = "auto"  # what the user asked for
    ef_search: int | None = None  # HNSW
    nprobe: int | None = None  # IVF
    # HNSW: how many stored vectors (spread over the layout) a query is compared with exactly, to
    # start its graph search at the nearest; None: FAISS's own descent from its one entry point
    entry_sample: int | None = None
    measured_recall_at_10: float | None = None


@dataclass
class Manifest:
    """manifest.json: what built the index and how to read it."""

    model: ModelRef
    dim: int
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    index: IndexParams = field(default_factory=IndexParams)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = int(data.get("schema_version", 0))
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"index schema version {version} is newer than this mmsearch supports "
                f"({SCHEMA_VERSION}); upgrade mmsearch"
            )
        if version < 1:
            raise SchemaError(f"index schema version {version} is not a mmsearch index")
        return cls(
            model=ModelRef(**data["model"]),
            dim=int(data["dim"]),
            schema_version=version,
            created=data.get("created", now_iso()),
            updated=data.get("updated", now_iso()),
            index=IndexParams(**data.get("index", {})),
            fusion=FusionConfig(**data.get("fusion", {})),
        )

    @classmethod
    def load(cls, index_dir: Path) -> Manifest:
        path = index_dir / MANIFEST_NAME
        if not path.is_file():
            raise IndexNotFoundError(f"no index at {index_dir} (missing {MANIFEST_NAME})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SchemaError(f"{path}: unreadable manifest ({exc})") from exc
        return cls.from_dict(data)

    def save(self, index_dir: Path) -> None:
        self.updated = now_iso()
        write_json_atomic(index_dir / MANIFEST_NAME, self.to_dict())
