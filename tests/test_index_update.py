"""An ingest that writes updates the published FAISS files in place where that gives what a rebuild
gives (added vectors; removals from flat / ivfpq), and a run that writes nothing republishes them as
they are. Everything else is rebuilt from the store, as before."""

import faiss
import pytest

from mmsearch.collection import UPDATE_MAX_GROWTH, Collection
from mmsearch.config import MODALITIES
from mmsearch.index import VectorIndex
from mmsearch.ingest import IngestOptions, ingest


def run(csv, index, encoder, index_type=None):
    return ingest(csv, index, IngestOptions(batch_size=4, index_type=index_type), encoder=encoder)


def published_equals_store(index) -> None:
    """The published files are fresh, hold each stored id once with its stored vector, and nothing else."""
    collection = Collection.open(index)
    try:
        assert collection.faiss_state()["generation"] == collection.store.generation()
        for modality in MODALITIES:
            published = collection.vector_index(modality)
            ids, vectors = collection.all_vectors(modality)
            assert published.ntotal == len(ids), modality
            for item_id, vector in zip(ids, vectors):
                scores, found = published.search(vector, len(ids))
                assert set(found[0].tolist()) == set(ids.tolist()), modality
                own = scores[0][found[0] == item_id]
                assert len(own) == 1 and own[0] == pytest.approx(1.0, abs=1e-5), (modality, item_id)
    finally:
        collection.close()


def params_of(index, modality="image"):
    """(the loaded index's IndexParams, the manifest's)."""
    collection = Collection.open(index)
    try:
        return collection.vector_index(modality).params, collection.manifest.index
    finally:
        collection.close()


def damage_published(index, modality: str, garbage: bytes):
    """Overwrite the published file of `modality` after publishing; returns its path."""
    collection = Collection.open(index)
    path = index / collection.faiss_state()["files"][modality]
    collection.close()
    path.write_bytes(garbage)
    return path


def add_rows(csv, rows: list[str]) -> None:
    csv.write_text(csv.read_text() + "".join(row + "\n" for row in rows))


def edit_row(csv, key: str, old: str, new: str) -> None:
    lines = csv.read_text().splitlines()
    lines = [line.replace(old, new) if line.startswith(key + ",") else line for line in lines]
    csv.write_text("\n".join(lines) + "\n")


def drop_row(csv, key: str) -> None:
    csv.write_text("\n".join(ln for ln in csv.read_text().splitlines() if not ln.startswith(key + ",")) + "\n")


def test_added_changed_and_removed_items_update_a_flat_index_in_place(tmp_path, catalog_dir, tiny_encoder):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    assert run(csv, index, tiny_encoder).index_updated == []  # a new index is built
    add_rows(csv, ["boot-red-2,images/boot-red.jpg,a second red boot,Shoes,70,red"])
    edit_row(csv, "bag-black", "a black shoulder bag", "a black tote bag")  # a new caption vector
    drop_row(csv, "dress-purple")  # its image and caption vectors go
    report = run(csv, index, tiny_encoder)
    assert (report.added, report.updated, report.removed) == (1, 1, 1)
    assert report.index_updated == ["image", "text"]
    published_equals_store(index)


def test_a_run_that_writes_nothing_keeps_the_published_files(tmp_path, catalog_dir, tiny_encoder, monkeypatch):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    run(csv, index, tiny_encoder)
    before = {p.name: p.stat().st_mtime_ns for p in index.glob("*.faiss")}

    def no_build(*args, **kwargs):
        raise AssertionError("nothing changed: no index may be built")

    monkeypatch.setattr(VectorIndex, "build", no_build)
    report = run(csv, index, tiny_encoder)
    assert report.unchanged == 9 and report.index_updated == []
    assert {p.name: p.stat().st_mtime_ns for p in index.glob("*.faiss")} == before
    published_equals_store(index)


def test_hnsw_takes_additions_in_place_and_is_rebuilt_for_a_removal(tmp_path, catalog_dir, tiny_encoder):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    run(csv, index, tiny_encoder, "hnsw")
    add_rows(csv, ["hat-teal,images/boot-blue.jpg,a teal hat,Hats,12,teal"])  # 1 of 9: within the growth limit
    assert run(csv, index, tiny_encoder, "hnsw").index_updated == ["image", "text"]
    published_equals_store(index)
    edit_row(csv, "hat-teal", "a teal hat", "a teal cap")  # replaces a caption: hnsw cannot remove the old one
    report = run(csv, index, tiny_encoder, "hnsw")
    assert report.index_updated == ["image"]  # no image changed; the text index was rebuilt
    published_equals_store(index)


def test_a_later_run_keeps_the_type_the_index_was_built_with(tmp_path, catalog_dir, tiny_encoder):
    """9 items would be flat under auto; without --index-type a run keeps (and updates) the hnsw."""
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    run(csv, index, tiny_encoder, "hnsw")
    add_rows(csv, ["hat-teal,images/boot-blue.jpg,a teal hat,Hats,12,teal"])
    assert run(csv, index, tiny_encoder).index_updated == ["image", "text"]
    loaded, manifest = params_of(index)
    assert loaded.index_type == "hnsw" and manifest.requested == "hnsw"
    run(csv, index, tiny_encoder, "auto")  # nothing to encode, but auto asked for: rebuilt as flat
    assert params_of(index)[0].index_type == "flat"
    published_equals_store(index)


def test_an_ann_index_grown_past_the_limit_is_rebuilt_and_tuned_again(tmp_path, catalog_dir, tiny_encoder):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    run(csv, index, tiny_encoder, "hnsw")
    grow = int(UPDATE_MAX_GROWTH * 9) + 1
    add_rows(csv, [f"more-{i},,a plain cotton scarf number {i},Scarves,{i},grey" for i in range(grow)])
    report = run(csv, index, tiny_encoder, "hnsw")
    assert report.added == grow and report.index_updated == ["image"]  # captions grew past the limit
    published_equals_store(index)
    assert params_of(index, "text")[0].measured_recall_at_10 is not None  # tuned at the new size


def test_a_changed_index_type_is_rebuilt_not_updated(tmp_path, catalog_dir, tiny_encoder):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    run(csv, index, tiny_encoder, "flat")
    add_rows(csv, ["boot-red-2,images/boot-red.jpg,a second red boot,Shoes,70,red"])
    assert run(csv, index, tiny_encoder, "hnsw").index_updated == []
    assert params_of(index)[0].index_type == "hnsw"
    published_equals_store(index)


def test_a_damaged_published_file_is_rebuilt_from_the_store(tmp_path, catalog_dir, tiny_encoder):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    run(csv, index, tiny_encoder)
    damage_published(index, "image", b"not a faiss file")  # the update must not use it
    add_rows(csv, ["boot-red-2,images/boot-red.jpg,a second red boot,Shoes,70,red"])
    report = run(csv, index, tiny_encoder)
    assert "image" not in report.index_updated
    published_equals_store(index)


def test_a_run_that_writes_nothing_rebuilds_a_damaged_published_file(tmp_path, catalog_dir, tiny_encoder):
    csv, index = catalog_dir / "catalog.csv", tmp_path / "idx"
    run(csv, index, tiny_encoder)
    image_file = damage_published(index, "image", b"\0garbage" * 100)
    assert run(csv, index, tiny_encoder).unchanged == 9
    published_equals_store(index)  # loads the file itself: a reader's rebuild in memory would not do
    collection = Collection.open(index)
    try:
        assert collection._try_load(image_file.name, "image", collection.faiss_state(), True) is not None
    finally:
        collection.close()


def test_ivfpq_drops_changed_and_removed_vectors_in_place(tmp_path, tiny_encoder):
    """300 captions (PQ trains 256 centroids); one caption changed and one row dropped: removed in place."""
    csv, index = tmp_path / "catalog.csv", tmp_path / "idx"
    csv.write_text("id,caption\n" + "".join(f"p{i},a {('red', 'blue', 'green')[i % 3]} product {i}\n"
                                            for i in range(300)))
    run(csv, index, tiny_encoder, "ivfpq")
    edit_row(csv, "p7", "product 7", "shirt seven")
    drop_row(csv, "p8")
    report = run(csv, index, tiny_encoder)
    assert (report.updated, report.removed, report.index_updated) == (1, 1, ["text"])  # no image index to keep
    collection = Collection.open(index)
    try:
        published = collection.vector_index("text")
        assert published.params.index_type == "ivfpq"
        ivf = faiss.extract_index_ivf(published.index)
        ivf.nprobe = ivf.nlist  # every list: the whole content
        ids, vectors = collection.all_vectors("text")
        _, found = published.search(vectors[:1], published.ntotal)
        assert published.ntotal == len(ids) == 299 and sorted(found[0].tolist()) == sorted(ids.tolist())
    finally:
        collection.close()
