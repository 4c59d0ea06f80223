"""Fault-injection harness: SIGKILL real `mmsearch index` runs at seeded points, check, resume.

Each run is the real CLI (`mmsearch.cli`, the code `python -m mmsearch index` runs) in its own
process, over a generated catalog of ~300 small images with batch size 8, so there are dozens of
commits. Runs are killed two ways:

- at a named step of the commit protocol: MMSEARCH_FAULT_AT=N makes the process SIGKILL itself at the
  Nth point it reaches (store-created, manifest-written, batch-committed, faiss-file-written,
  faiss-json-written, index-published; see mmsearch.store.fault_point), N drawn from a seeded RNG;
- at a seeded random time within the measured duration of the runs (mid-decode, mid-commit,
  mid-FAISS write: wherever it lands).

After every kill the index must be consistent (see `check_consistent`) and searchable by a reader;
the next run resumes. Items committed before a kill carry a sentinel in their `updated` column: a
resumed run that re-encoded one would overwrite it. The last run is a real `python -m mmsearch index`
subprocess whose report must count every previously committed item `unchanged` and the rest `added`.

Killed runs are forked from a "zygote" process that has already imported torch and open_clip, so a
kill costs about a second instead of the ~8 s of a cold interpreter (the forked child runs the same
CLI code path as `python -m mmsearch`).

    python tests/crash_harness.py --kills 24 --seed 0     # prints the summary
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "committed-before-kill"
BATCH_SIZE = 8
TINY = "mmsearch-tiny"


# -- the catalog --------------------------------------------------------------------------------------
def make_catalog(folder: Path, n: int = 300, seed: int = 0, caption_every: int = 4) -> Path:
    """n small random-texture PNGs; every caption_every-th item also has a caption. Returns the CSV."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["id,image,caption,shade"]
    for i in range(n):
        pixels = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((24, 24)).save(folder / f"images/p{i:03d}.png")
        caption = f"product number {i}" if i % caption_every == 0 else ""
        rows.append(f"p{i:03d},images/p{i:03d}.png,{caption},{i % 7}")
    path = folder / "catalog.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


# -- checks ---------------------------------------------------------------------------------------------
def sqlite_vector_ids(index_dir: Path, modality: str) -> list[int]:
    with _db(index_dir) as conn:
        return [r[0] for r in conn.execute("SELECT item_id FROM vectors WHERE modality = ?", (modality,))]


def faiss_ids(vector_index) -> list[int]:
    import faiss

    return faiss.vector_to_array(faiss.downcast_index(vector_index.index).id_map).tolist()


def check_consistent(index_dir: Path, encoder=None) -> dict:
    """The definition of consistent: opening the collection (as a reader does) gives, per modality,
    FAISS ids == SQLite vector ids, each once; FAISS files that faiss.json names for the store's
    current generation hold exactly those ids; a reader search succeeds and returns stored items."""
    from mmsearch.collection import Collection
    from mmsearch.index import VectorIndex

    collection = Collection.open(index_dir)
    try:
        generation = collection.store.generation()
        state = collection.faiss_state()
        fresh = state.get("generation") == generation
        for modality in ("image", "text"):
            want = sqlite_vector_ids(index_dir, modality)
            got = faiss_ids(collection.vector_index(modality))
            assert len(got) == len(set(got)), f"{modality}: duplicate FAISS ids"
            assert sorted(got) == sorted(want), f"{modality}: FAISS ids != SQLite ids"
            if fresh:
                published = VectorIndex.load(index_dir / state["files"][modality], collection.manifest.index)
                assert sorted(faiss_ids(published)) == sorted(want), f"{modality}: published file differs"
    finally:
        collection.close()
    if encoder is not None:
        _check_search(index_dir, encoder)
    return {"generation": generation, "fresh": fresh}


def _check_search(index_dir: Path, encoder) -> None:
    from mmsearch.search import Searcher, build_query

    with Searcher(index_dir, encoder=encoder) as searcher:
        for target in ("image", "text", "item"):
            result = searcher.search(build_query(texts=["product number 12"], target=target, k=5))
            for hit in result.results:
                assert searcher.collection.store.item_by_key(hit.id) is not None, hit.id


def committed_keys(index_dir: Path) -> set[str]:
    if not (index_dir / "items.sqlite").exists():
        return set()
    with _db(index_dir) as conn:
        return {r[0] for r in conn.execute("SELECT key FROM items")}


def mark_committed(index_dir: Path) -> int:
    """Stamp every committed item; a run that re-encodes one rewrites `updated` and loses the stamp."""
    if not (index_dir / "items.sqlite").exists():
        return 0
    with _db(index_dir) as conn:
        conn.execute("UPDATE items SET updated = ?", (SENTINEL,))
        return conn.execute("SELECT count(*) FROM items").fetchone()[0]


def re_encoded(index_dir: Path, stamped: set[str]) -> set[str]:
    with _db(index_dir) as conn:
        kept = {r[0] for r in conn.execute("SELECT key FROM items WHERE updated = ?", (SENTINEL,))}
    return stamped - kept


class _db:
    def __init__(self, index_dir: Path):
        self.conn = sqlite3.connect(index_dir / "items.sqlite", timeout=30)

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        if exc[0] is None:
            self.conn.commit()
        self.conn.close()


# -- running the CLI in killable processes ------------------------------------------------------------
class Zygote:
    """A process that imported mmsearch, torch and open_clip once and forks one child per run."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], log: Path, fault_at: int | None = None, kill_after: float | None = None):
        """Run `mmsearch ARGV`; returns (exit code, -9 when killed; seconds; stderr text)."""
        env = {"MMSEARCH_FAULT_AT": str(fault_at)} if fault_at else {}
        request = {"argv": argv, "env": env, "log": str(log), "cwd": str(log.parent)}
        start = time.monotonic()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished first
                pass
        code = json.loads(self.proc.stdout.readline())["code"]
        return code, time.monotonic() - start, log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _zygote_main() -> None:
    # the expensive imports, once, before any fork (the CLI and load_encoder import these lazily)
    import faiss  # noqa: F401
    import open_clip  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm  # noqa: F401
    from PIL import Image

    import mmsearch.cli  # noqa: F401
    import mmsearch.ingest  # noqa: F401
    import mmsearch.search  # noqa: F401

    Image.init()

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(request: dict) -> None:
    code = 1
    try:
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from mmsearch.cli import cli

        cli.main(args=request["argv"], prog_name="mmsearch")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: B036  report anything and still leave through os._exit
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def run_cli_subprocess(argv: list[str], cwd: Path, timeout: float = 300,
                       env: dict | None = None) -> subprocess.CompletedProcess:
    """A cold `python -m mmsearch ARGV`, the way a user runs it (env: extra variables)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": _pythonpath()}
    return subprocess.run([sys.executable, "-m", "mmsearch", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- the harness ----------------------------------------------------------------------------------------
@dataclass
class Summary:
    kills: int = 0
    hook_kills: int = 0
    timed_kills: int = 0
    runs: int = 0
    by_point: Counter = field(default_factory=Counter)
    stale_after_kill: int = 0
    items: int = 0
    final_report: dict = field(default_factory=dict)
    re_encoded: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        points = ", ".join(f"{k} {v}" for k, v in sorted(self.by_point.items()))
        return (f"crash harness: {self.kills} kills survived ({self.hook_kills} at protocol steps: {points}; "
                f"{self.timed_kills} at random times) over {self.runs} runs; nothing lost: "
                f"{self.items}/{self.items} items indexed, {self.re_encoded} re-encoded; {self.seconds:.0f} s")


class Harness:
    def __init__(self, workdir: Path, checkpoint: Path, encoder=None, n_items: int = 300, seed: int = 0):
        self.workdir = workdir
        self.catalog = make_catalog(workdir / "catalog", n_items, seed)
        self.index = workdir / "index"
        self.n_items = n_items
        self.checkpoint = checkpoint
        self.encoder = encoder
        self.rng = np.random.default_rng(seed)
        self.summary = Summary(items=n_items)
        self.stamped: set[str] = set()
        self.walls: list[float] = []

    def argv(self) -> list[str]:
        return ["index", str(self.catalog), "--index", str(self.index), "--model", TINY, "--pretrained",
                str(self.checkpoint), "--batch-size", str(BATCH_SIZE), "--workers", "2", "-q", "--format", "json"]

    def run(self, kills: int = 20, timed: int = 4) -> Summary:
        start = time.monotonic()
        with Zygote() as zygote:
            # the first-ever run, killed before its manifest exists, then right after writing it
            for point in (1, 2):
                self._one(zygote, fault_at=point)
            while self.summary.kills < kills + timed and self._points_left() > 0:
                if self.summary.timed_kills < timed and self.summary.runs % 4 == 3 and self._batches_left() > 8:
                    self._one(zygote, kill_after=self._random_delay())
                else:
                    self._one(zygote, fault_at=self._random_point(kills + timed))
        self._final()
        self.summary.seconds = time.monotonic() - start
        return self.summary

    def _random_point(self, target: int) -> int:
        """N for MMSEARCH_FAULT_AT: never past the points left (the run must die), and large enough on
        average that the kills spread over the whole catalog rather than its first batches."""
        left = self._points_left()
        spread = -(-5 * left // (2 * max(1, target - self.summary.kills)))
        return int(self.rng.integers(1, min(left, max(3, spread)) + 1))

    def _batches_left(self) -> int:
        return -(-(self.n_items - len(committed_keys(self.index))) // BATCH_SIZE)

    def _points_left(self) -> int:
        """A lower bound of the fault points the next run reaches (batch commits + publishing)."""
        if not (self.index / "manifest.json").exists():
            return 2
        state = self.index / "faiss.json"
        fresh = state.exists() and json.loads(state.read_text()).get("generation") == self._generation()
        return self._batches_left() + (0 if fresh else 3)

    def _generation(self) -> int:
        with _db(self.index) as conn:
            row = conn.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _random_delay(self) -> float:
        """A random moment of a run, uniform over the measured duration of the shortest run so far: the
        run it kills still has more than 8 batches to go, so it cannot finish first."""
        return float(self.rng.uniform(0.2, 0.9) * min(self.walls))

    def _one(self, zygote: Zygote, fault_at: int | None = None, kill_after: float | None = None) -> None:
        self.summary.runs += 1
        log = self.workdir / f"run-{self.summary.runs}.log"
        code, wall, output = zygote.run(self.argv(), log, fault_at=fault_at, kill_after=kill_after)
        self.walls.append(wall)
        if code != -signal.SIGKILL:
            assert code == 0, f"run {self.summary.runs} failed (exit {code}):\n{output}"
            return
        self.summary.kills += 1
        if fault_at is not None:
            self.summary.hook_kills += 1
            point = output.split("fault injected at ")[-1].split(" ")[0] if "fault injected" in output else "?"
            self.summary.by_point[point] += 1
        else:
            self.summary.timed_kills += 1
        self._after_kill()

    def _after_kill(self) -> None:
        if not (self.index / "manifest.json").exists():
            self._check_not_an_index()
            return
        lost = re_encoded(self.index, self.stamped)
        assert not lost, f"committed items re-encoded after a kill: {sorted(lost)[:5]}"
        state = check_consistent(self.index, self.encoder)
        self.summary.stale_after_kill += not state["fresh"]
        mark_committed(self.index)
        self.stamped = committed_keys(self.index)

    def _check_not_an_index(self) -> None:
        """Killed before the manifest: readers get a clear 'no index', nothing is half-there."""
        from mmsearch.errors import IndexNotFoundError
        from mmsearch.search import Searcher

        try:
            Searcher(self.index, encoder=self.encoder).close()
        except IndexNotFoundError:
            return
        raise AssertionError("a folder without manifest.json opened as an index")

    def _final(self) -> None:
        done = run_cli_subprocess(self.argv(), cwd=self.workdir)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        self.summary.final_report = report
        before = len(self.stamped)
        assert report["failed"] == [] and report["updated"] == report["removed"] == 0, report
        assert (report["unchanged"], report["added"]) == (before, self.n_items - before), report
        assert committed_keys(self.index) == {f"p{i:03d}" for i in range(self.n_items)}
        lost = re_encoded(self.index, self.stamped)
        self.summary.re_encoded = len(lost)
        assert not lost, f"committed items re-encoded by the final run: {sorted(lost)[:5]}"
        assert check_consistent(self.index, self.encoder)["fresh"], "final FAISS files are stale"
        self._check_clean_folder()

    def _check_clean_folder(self) -> None:
        """No temp files and no FAISS files but the two faiss.json names survive the kills."""
        state = json.loads((self.index / "faiss.json").read_text())
        names = {p.name for p in self.index.iterdir()}
        assert not [n for n in names if n.endswith(".tmp")], names
        assert {n for n in names if n.endswith(".faiss")} == set(state["files"].values()), names
        assert len(sqlite_vector_ids(self.index, "image")) == self.n_items
        assert len(sqlite_vector_ids(self.index, "text")) == -(-self.n_items // 4)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kills", type=int, default=20, help="kills at protocol steps (besides the timed ones)")
    parser.add_argument("--timed", type=int, default=4, help="kills at random times")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.zygote:
        _zygote_main()
        return
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file

    from mmsearch.encoders import load_encoder

    with tempfile.TemporaryDirectory(prefix="mmsearch-crash-") as tmp:
        encoder = load_encoder(TINY, "random")
        checkpoint = Path(tmp) / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(checkpoint))
        summary = Harness(Path(tmp), checkpoint, encoder, args.items, args.seed).run(args.kills, args.timed)
    print(summary.line())


if __name__ == "__main__":
    main()
