"""Contrastive training on a tiny generated catalog (coloured shapes) with the tiny test model."""

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmsearch import train as training
from mmsearch.encoders import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, load_encoder
from mmsearch.train import (
    STATE_JSON,
    STATE_TENSORS,
    TrainError,
    TrainOptions,
    augment_caption,
    caption_variants,
    clip_loss,
    epoch_order,
    group_loss,
    lr_at,
    multi_positive_targets,
    parse_caption,
    train,
)

TINY = "mmsearch-tiny"
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (40, 170, 60), "yellow": (240, 220, 40)}
SHAPES = ("square", "bar")


def _draw(shape: str, rgb, offset: int) -> Image.Image:
    pixels = np.full((32, 32, 3), 235, dtype=np.uint8)
    if shape == "square":
        pixels[6 + offset : 22 + offset, 6 + offset : 22 + offset] = rgb
    else:
        pixels[12 + offset : 18 + offset, 2:30] = rgb
    return Image.fromarray(pixels)


@pytest.fixture
def shapes_catalog(tmp_path):
    return write_shapes_catalog(tmp_path)


def write_shapes_catalog(tmp_path):
    """32 items: 2 shapes x 8 products, each product in 2 of 4 colours (variants share `product`)."""
    (tmp_path / "img").mkdir()
    rows = []
    names = list(COLOURS)
    for shape in SHAPES:
        for product in range(8):
            for colour in (names[product % 4], names[(product + 1) % 4]):
                key = f"{shape}-{product}-{colour}"
                _draw(shape, COLOURS[colour], product % 4).save(tmp_path / "img" / f"{key}.png")
                rows.append({"id": key, "image": f"img/{key}.png", "caption": f"a {colour} {shape}",
                             "product": f"{shape}-{product}"})
    path = tmp_path / "catalog.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "caption", "product"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread: the tiny model gains nothing from more, and on a busy shared machine OpenMP threads
    spinning for a core can make each step 20x slower."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(training, "set_torch_threads", lambda: torch.set_num_threads(1))
    yield
    torch.set_num_threads(threads)


def _options(**overrides) -> TrainOptions:
    base = dict(model=TINY, pretrained="random", epochs=2, batch_size=8, lr=2e-3, warmup_steps=2,
                val_fraction=0.125, augment=False, caption_templates=False)
    return TrainOptions(**{**base, **overrides})


def _weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / MODEL_WEIGHTS_FILE))


# -- losses and targets --------------------------------------------------------------------------


def test_duplicate_captions_share_the_target_mass():
    targets = multi_positive_targets(torch.tensor([0, 1, 0, 2, 0]))
    expected_row = torch.tensor([1 / 3, 0, 1 / 3, 0, 1 / 3])
    assert torch.allclose(targets[0], expected_row) and torch.allclose(targets[2], expected_row)
    assert torch.allclose(targets[1], torch.tensor([0.0, 1, 0, 0, 0]))
    assert torch.allclose(targets.sum(dim=1), torch.ones(5))
    assert torch.equal(targets > 0, (targets > 0).T)  # same positives in both directions


def test_duplicates_are_not_negatives_in_the_loss():
    """Two items share a caption and an embedding: optimal for multi-positive targets, not for one-hot ones."""
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(100.0)
    twins = torch.tensor([0, 0, 1])
    target_entropy = 2 * math.log(2) / 3  # the lowest a soft cross-entropy can go with these targets
    assert clip_loss(embeddings, embeddings, scale, twins) == pytest.approx(target_entropy, abs=1e-4)
    one_hot = clip_loss(embeddings, embeddings, scale, torch.tensor([0, 1, 2]))  # its optimum would be 0
    assert one_hot > 0.4


def test_group_loss_pulls_variants_and_ignores_singletons():
    variants = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(20.0)
    assert group_loss(variants, scale, torch.tensor([0, 0, 1])) < 0.01
    assert group_loss(variants, scale, torch.tensor([0, 1, 1])) > 1.0
    assert group_loss(variants, scale, torch.tensor([0, 1, 2])) == 0  # no item has a group-mate


def test_lr_warms_up_then_decays_to_zero():
    options = TrainOptions(lr=1.0, warmup_steps=10, epochs=1)
    assert lr_at(0, 0.0, options) == pytest.approx(0.1)
    assert lr_at(9, 0.0, options) == pytest.approx(1.0)
    assert lr_at(50, 0.5, options) == pytest.approx(0.5)
    assert lr_at(99, 1.0, options) == pytest.approx(0.0)


def test_epoch_order_is_seeded_and_keeps_groups_together():
    train_idx = np.arange(12)
    groups = torch.arange(12) // 3
    first = epoch_order(train_idx, groups, seed=0, epoch=0)
    assert np.array_equal(first, epoch_order(train_idx, groups, seed=0, epoch=0))
    assert not np.array_equal(first, epoch_order(train_idx, groups, seed=0, epoch=1))
    assert sorted(first) == list(range(12))
    runs = groups[torch.from_numpy(first)].tolist()
    assert [runs[i] for i in range(0, 12, 3)] == [runs[i + 2] for i in range(0, 12, 3)]


# -- captions -----------------------------------------------------------------------------------


def test_paraphrases_keep_colour_and_category():
    assert parse_caption("A Red Ankle Boot.") == ("red", "ankle boot")
    assert parse_caption("an orange pair of trousers") == ("orange", "pair of trousers")
    assert parse_caption("light blue t-shirt") == ("light blue", "t-shirt")
    variants = caption_variants("a red ankle boot")
    for wanted in ("ankle boots in red", "a red boot", "crimson ankle boot", "a photo of a red ankle boot"):
        assert wanted in variants
    reds = ("red", "crimson", "scarlet")
    assert all(any(r in v for r in reds) and "boot" in v and "blue" not in v for v in variants)
    assert "pants in orange" in caption_variants("an orange pair of trousers")


def test_unparsed_captions_are_only_wrapped():
    variants = caption_variants("Vintage leather satchel")
    assert variants[0] == "vintage leather satchel"
    assert all("vintage leather satchel" in v for v in variants)


def test_augmentation_is_seeded_and_mixes_original_and_paraphrases():
    draws = [augment_caption("a red ankle boot", np.random.default_rng([0, i])) for i in range(200)]
    assert draws == [augment_caption("a red ankle boot", np.random.default_rng([0, i])) for i in range(200)]
    assert 20 < draws.count("a red ankle boot") < 100 and len(set(draws)) > 20


def test_flip_augmentation_mirrors_whole_images_exactly_and_is_seeded():
    batch = torch.rand(64, 3, 8, 8)
    flipped = training.PixelPipeline.flip(batch, torch.Generator().manual_seed(3))
    mirrored = [bool(torch.equal(f, b.flip(-1))) for f, b in zip(flipped, batch)]
    kept = [bool(torch.equal(f, b)) for f, b in zip(flipped, batch)]
    assert all(m != k for m, k in zip(mirrored, kept)) and 16 < sum(mirrored) < 48
    torch.testing.assert_close(flipped, training.PixelPipeline.flip(batch, torch.Generator().manual_seed(3)))


# -- training runs --------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_a_loadable_model(shapes_catalog, tmp_path):
    out = tmp_path / "model"
    events = []
    report = train(shapes_catalog, out, _options(epochs=6), events.append)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert report["steps"] == len(losses) == 6 * 3  # 28 training items // batch 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2
    validations = [e for e in events if e["event"] == "validation"]
    assert len(validations) == 6 and {"t2i_R@1", "t2i_R@5", "i2t_top1"} <= set(validations[-1]["val"])
    card = json.loads((out / "model_card.json").read_text())
    assert card["base_model"] == TINY and card["steps"] == 18 and card["n_items"] == 32
    assert card["n_train"] == 28 and card["n_val"] == 4 and "i2t_top1" in card["metrics"]
    encoder = load_encoder(str(out))
    assert encoder.encode_texts(["a red square"]).shape == (1, encoder.dim)


def test_state_files_are_safetensors_and_json_never_pickle(shapes_catalog, tmp_path):
    out = tmp_path / "model"
    train(shapes_catalog, out, _options(epochs=1))
    assert {p.name for p in out.iterdir()} == {MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, "model_card.json",
                                                STATE_JSON, STATE_TENSORS}
    for path in out.iterdir():  # every file is JSON or safetensors: nothing there could hold a pickle
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".safetensors" and load_file(str(path))
    state = load_file(str(out / STATE_TENSORS))
    assert any(k.endswith("/exp_avg") for k in state) and "rng/torch" in state
    assert json.loads((out / STATE_JSON).read_text())["step"] == 3


def test_resume_continues_the_step_counter(shapes_catalog, tmp_path):
    out = tmp_path / "model"
    train(shapes_catalog, out, _options(epochs=1))
    events = []
    report = train(shapes_catalog, out, _options(epochs=3, resume=True), events.append)
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps[0] == 4 and report["steps"] == 9
    assert [h["step"] for h in report["history"]] == [3, 6, 9]


def test_interrupted_run_resumes_to_the_same_weights(shapes_catalog, tmp_path):
    options = _options(epochs=2, augment=True, caption_templates=True, group_column="product")
    train(shapes_catalog, tmp_path / "straight", options)

    def interrupt(event):
        if event["event"] == "step" and event["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(shapes_catalog, tmp_path / "resumed", options, interrupt)
    assert json.loads((tmp_path / "resumed" / STATE_JSON).read_text())["step"] == 4
    train(shapes_catalog, tmp_path / "resumed", TrainOptions(**{**options.__dict__, "resume": True}))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("frozen, prefix_check", [("image", "visual."), ("text", "transformer.")])
def test_freeze_leaves_the_tower_unchanged(shapes_catalog, tmp_path, frozen, prefix_check):
    before = {k: v.clone() for k, v in load_encoder(TINY, "random").model.state_dict().items()}
    out = tmp_path / "model"
    train(shapes_catalog, out, _options(epochs=1, freeze=frozen))
    after = _weights(out)
    frozen_keys = [k for k in before if k.startswith(prefix_check)]
    moving_keys = [k for k in before if not k.startswith(prefix_check) and k != "logit_scale"]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)
    assert any(not torch.equal(before[k], after[k]) for k in moving_keys)


def test_train_last_blocks_trains_only_the_top(shapes_catalog, tmp_path):
    before = load_encoder(TINY, "random").model.state_dict()
    out = tmp_path / "model"
    train(shapes_catalog, out, _options(epochs=1, train_last_blocks=1))
    after = _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("visual.transformer.resblocks.0.", "transformer.resblocks.0.")) for k in changed)
    assert not any(k.startswith(("visual.conv1", "token_embedding", "positional_embedding")) for k in changed)
    assert any(k.startswith("visual.transformer.resblocks.1.") for k in changed)
    assert any(k.startswith("transformer.resblocks.1.") for k in changed)
    assert "visual.proj" in changed and "text_projection" in changed


def test_bad_images_are_skipped_by_name(shapes_catalog, tmp_path, caplog):
    (shapes_catalog.parent / "img" / "square-0-red.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger=training.log.name):
        report = train(shapes_catalog, tmp_path / "model", _options(epochs=1))
    assert any("square-0-red" in line for line in report["skipped"])
    assert "square-0-red" in caplog.text


def test_options_are_checked():
    with pytest.raises(TrainError, match="epochs or minutes"):
        TrainOptions().validate()
    with pytest.raises(TrainError, match="freeze"):
        TrainOptions(epochs=1, freeze="both").validate()
    with pytest.raises(TrainError, match="precision must be one of fp32, bf16, bf16-image, got 'fp16'"):
        TrainOptions(epochs=1, precision="fp16").validate()


@pytest.mark.parametrize(("precision", "image_dtype", "text_dtype"), [
    ("fp32", torch.float32, torch.float32),
    ("bf16", torch.bfloat16, torch.bfloat16),
    ("bf16-image", torch.bfloat16, torch.float32),
])
def test_precision_sets_each_towers_autocast(shapes_catalog, tmp_path, monkeypatch, precision, image_dtype,
                                            text_dtype):
    seen: dict[str, torch.dtype] = {}
    build = training.build_model

    def build_with_hooks(options, resume_dir):
        model = build(options, resume_dir)  # the first forward of each tower is a training step's
        for tower, module in (("image", model.visual), ("text", model.transformer)):
            # a Linear is an autocast op; attention's out_proj is never called (MHA reads its weight)
            first_linear = next(m for name, m in module.named_modules()
                                if isinstance(m, torch.nn.Linear) and not name.endswith("out_proj"))
            first_linear.register_forward_hook(lambda m, i, out, tower=tower: record(tower, out))
        return model

    def record(tower, out):  # returns None: the hook must not replace the output
        seen.setdefault(tower, out.dtype)

    monkeypatch.setattr(training, "build_model", build_with_hooks)
    report = train(shapes_catalog, tmp_path / "model", _options(epochs=1, precision=precision))
    assert seen == {"image": image_dtype, "text": text_dtype}
    assert math.isfinite(report["final_loss"])


def test_minutes_stop_the_run(shapes_catalog, tmp_path):
    report = train(shapes_catalog, tmp_path / "model", _options(epochs=None, minutes=1e-4))
    assert report["steps"] >= 1 and report["history"]
