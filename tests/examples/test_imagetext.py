"""Image-text reproductions (examples/food101.py, examples/n24news.py): readers, encoders, smoke runs.

Everything runs on generated data in the released layouts and on tiny random encoders saved
with ``save_pretrained``; nothing touches the network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[2]

from training.imagetext import data  # noqa: E402
from training.imagetext import smoke  # noqa: E402

transformers = pytest.importorskip("transformers")
from training.imagetext import models  # noqa: E402


# ----------------------------------------------------------------------------- readers


def test_food101_reader_drops_and_counts_missing_pairs_and_holds_out_validation(food):
    splits = data.load_food101(food, validation_size=4, split_seed=0)
    assert splits.classes == tuple(sorted(smoke.FOOD_CLASSES))
    # 4 classes x 5 pairs, plus one row without image and one without text per split
    assert len(splits.train) + len(splits.validation) == 20 and len(splits.validation) == 4
    assert len(splits.test) == 12
    assert splits.dropped == {"train": {"missing_image": 1, "missing_text": 1}, "test": {"missing_image": 1, "missing_text": 1}}
    assert not {s.image for s in splits.train} & {s.image for s in splits.validation}
    for sample in splits.train + splits.validation + splits.test:
        name = splits.classes[sample.label]
        assert sample.image.parent.name == name and sample.image.is_file()
        assert " ".join(name.split("_")) in sample.text
    again = data.load_food101(food, validation_size=4, split_seed=0)
    other = data.load_food101(food, validation_size=4, split_seed=1)
    assert [s.image for s in again.validation] == [s.image for s in splits.validation]
    assert [s.image for s in other.validation] != [s.image for s in splits.validation]
    assert "1 without image, 1 without text" in splits.summary()


def test_food101_reader_skips_a_header_row(food):
    path = food / "texts" / "test_titles.csv"
    path.write_text("image,text,label\n" + path.read_text())
    assert len(data.load_food101(food, validation_size=2).test) == 12


def test_food101_reader_ignores_a_byte_order_mark(food):
    plain = data.load_food101(food, validation_size=2)
    path = food / "texts" / "test_titles.csv"
    path.write_text(path.read_text(encoding="utf-8"), encoding="utf-8-sig")
    assert data.load_food101(food, validation_size=2).test == plain.test  # the first pair is kept


def test_the_data_digest_follows_the_pairs(food):
    from training.imagetext.pipeline import splits_digest

    splits = data.load_food101(food, validation_size=4, split_seed=0)
    assert splits_digest(splits) == splits_digest(data.load_food101(food, validation_size=4, split_seed=0))
    assert splits_digest(splits) != splits_digest(data.load_food101(food, validation_size=4, split_seed=1))


@pytest.mark.parametrize("field", data.N24NEWS_TEXT_FIELDS)
def test_n24news_reader_uses_the_text_field_and_drops_missing_pairs(news, field):
    splits = data.load_n24news(news, text_field=field)
    assert splits.classes == tuple(sorted(smoke.NEWS_SECTIONS))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (20, 8, 12)
    assert all(v == {"missing_image": 1, "missing_text": 1} for v in splits.dropped.values())
    records = {r["image_id"]: r for r in json.loads((news / "news" / "nytimes_train.json").read_text())}
    for sample in splits.train:
        record = records[sample.image.stem]
        assert sample.text == record[field] and splits.classes[sample.label] == record["section"]


def test_validation_size_must_leave_training_pairs(food):
    with pytest.raises(ValueError, match="validation_size"):
        data.load_food101(food, validation_size=20)
    with pytest.raises(ValueError, match="validation_size"):
        data.load_food101(food, validation_size=0)


def test_bad_csv_row_names_the_file_and_line(food):
    path = food / "texts" / "train_titles.csv"
    lines = path.read_text().splitlines()
    lines[2] = "apple_pie_0.jpg,only two fields"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=r"train_titles\.csv, line 3: expected 3 fields"):
        data.load_food101(food, validation_size=2)


def test_missing_files_and_folders_are_named(food, news):
    os.remove(food / "texts" / "test_titles.csv")
    with pytest.raises(data.DataError, match=r"not found: .*test_titles\.csv"):
        data.load_food101(food, validation_size=2)
    os.rename(news / "imgs", news / "images")
    with pytest.raises(data.DataError, match=r"images folder not found: .*imgs"):
        data.load_n24news(news)


def test_empty_split_names_the_file(food, news):
    (food / "texts" / "test_titles.csv").write_text("")
    with pytest.raises(data.DataError, match=r"test split is empty: no usable pair in .*test_titles\.csv"):
        data.load_food101(food, validation_size=2)
    (news / "news" / "nytimes_dev.json").write_text("[]")
    with pytest.raises(data.DataError, match=r"dev split is empty: .*nytimes_dev\.json"):
        data.load_n24news(news)


def test_split_whose_images_are_all_missing_is_empty(news):
    for image in (news / "imgs").glob("test_*.jpg"):
        image.unlink()
    with pytest.raises(data.DataError, match=r"test split is empty.*\d+ without an image"):
        data.load_n24news(news)


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"headline": "a", ', r"nytimes_train\.json: invalid JSON at line 1"),
        ('{"headline": "a"}', r"nytimes_train\.json: expected a JSON list"),
        ('[{"headline": "a", "image_id": "train_0_0"}]', r"nytimes_train\.json, record 0: missing or non-string 'section'"),
        ('[{"headline": "a", "section": "Food"}]', r"record 0: missing or non-string 'image_id'"),
        ('[{"headline": 3, "image_id": "train_0_0", "section": "Food"}]', r"record 0: 'headline' is a int"),
        ("[1]", r"record 0: expected an object"),
    ],
)
def test_malformed_json_names_the_file(news, content, message):
    (news / "news" / "nytimes_train.json").write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_n24news(news)


def test_test_class_unknown_to_training_is_an_error(news):
    path = news / "news" / "nytimes_test.json"
    records = json.loads(path.read_text())
    records[0]["section"] = "Opinion"
    path.write_text(json.dumps(records))
    with pytest.raises(data.DataError, match=r"nytimes_test\.json: class 'Opinion' does not occur"):
        data.load_n24news(news)


def test_unreadable_image_names_the_file(food):
    splits = data.load_food101(food, validation_size=2)
    broken = splits.train[0].image
    broken.write_bytes(b"not a jpeg")
    dataset = data.ImageTextDataset(splits.train, data.ImageTransform((8, 8), (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(data.DataError, match=f"cannot read image {broken}"):
        dataset[0]


def test_image_scan_finds_truncated_and_broken_files_before_training(food, tmp_path):
    splits = data.load_food101(food, validation_size=2)
    samples = [*splits.train, *splits.validation, *splits.test]
    assert data.find_unreadable_images(samples, threads=2) == []
    truncated, garbage = splits.train[1].image, splits.test[0].image
    # a real JPEG cut in half: its header opens, only a full decode fails
    encoded = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(encoded, format="JPEG")
    truncated.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    with Image.open(truncated) as opened:
        opened.verify()  # the cheap check passes: why the scan decodes in full
    garbage.write_bytes(b"not a jpeg")
    found = data.find_unreadable_images(samples, threads=2)
    assert sorted(path for path, _ in found) == sorted([truncated, garbage])
    assert all(str(path) in reason for path, reason in found)


def test_verify_images_option_stops_before_training_and_lists_the_files(food, encoders, tmp_path):
    import food101

    splits = data.load_food101(food, validation_size=4)
    broken = [splits.train[0].image, splits.test[1].image]
    for path in broken:
        path.write_bytes(b"\x00" * 10)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"food101: 2 of the images cannot be decoded") as stop:
        food101.main(food101.FOOD101, train_args(food, encoders, out) + ["--verify-images"])
    assert all(str(path) in str(stop.value) for path in broken)
    assert not out.exists()  # nothing was trained


# ----------------------------------------------------------------------------- encoders


def test_tiny_encoders_load_with_from_pretrained_and_give_first_token_embeddings(encoders, food):
    image_dir, text_dir = encoders
    image_encoder = models.ImageEncoder(str(image_dir))
    text_encoder = models.TextEncoder(str(text_dir))
    assert isinstance(image_encoder.model, transformers.ViTModel) and isinstance(text_encoder.model, transformers.BertModel)
    assert image_encoder.model.pooler is None and text_encoder.model.pooler is None
    tokenizer = models.load_tokenizer(str(text_dir))
    splits = data.load_food101(food, validation_size=2)
    dataset = data.ImageTextDataset(splits.train[:3], image_encoder.transform())
    (pixels, tokens), labels = data.ImageTextCollator(tokenizer, max_tokens=5)([dataset[i] for i in range(3)])
    assert labels.tolist() == [s.label for s in splits.train[:3]] and pixels.shape == (3, 3, 32, 32)
    assert tokens["input_ids"].shape[1] <= 5 and (tokens["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    image_encoder.eval(), text_encoder.eval()
    with torch.no_grad():
        z_img = image_encoder(pixels)
        z_txt = text_encoder(tokens)
        full = text_encoder.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        embeds = text_encoder.embed_tokens(tokens["input_ids"])
        by_embeds = text_encoder({"inputs_embeds": embeds, "attention_mask": tokens["attention_mask"]})
    assert z_img.shape == (3, image_encoder.out_dim) and z_txt.shape == (3, text_encoder.out_dim)
    torch.testing.assert_close(z_txt, full[:, 0])
    torch.testing.assert_close(by_embeds, z_txt)


def test_image_transform_matches_the_saved_vit_image_processor(encoders, food):
    from PIL import Image

    image_dir, _ = encoders
    processor = transformers.AutoImageProcessor.from_pretrained(str(image_dir))
    transform = models.ImageEncoder(str(image_dir)).transform()
    image = Image.open(next((food / "images" / "train" / "sushi").glob("*.jpg"))).convert("RGB")
    expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(transform(image), expected, atol=1e-5, rtol=0)
    flipped = transform.with_flip(True)
    torch.manual_seed(0)
    outs = [flipped(image) for _ in range(8)]
    assert any(torch.equal(o, expected.flip(-1)) for o in outs) and any(torch.equal(o, expected) for o in outs)


def test_roberta_loads_as_robertamodel(tmp_path):
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=40)
    transformers.RobertaModel(config).save_pretrained(tmp_path)
    encoder = models.TextEncoder(str(tmp_path))
    assert isinstance(encoder.model, transformers.RobertaModel) and encoder.max_positions == 38
    ids = torch.tensor([[0, 5, 6, 2, 1], [0, 7, 2, 1, 1]])
    mask = (ids != 1).long()
    encoder.eval()
    with torch.no_grad():
        by_embeds = encoder({"inputs_embeds": encoder.embed_tokens(ids), "attention_mask": mask})
        torch.testing.assert_close(by_embeds, encoder({"input_ids": ids, "attention_mask": mask}))


def test_weights_missing_from_a_checkpoint_are_reported(encoders, tmp_path):
    import shutil

    _, text_dir = encoders
    shutil.copytree(text_dir, tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    config["num_hidden_layers"] += 1  # the checkpoint lacks the last layer
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    with pytest.warns(RuntimeWarning, match=r"--text-encoder .*bert: \d+ weights are not in the checkpoint and start random \(encoder\.layer\.2\."):
        models.TextEncoder(str(tmp_path / "bert"))


def test_encoder_load_errors_name_the_path_and_option(tmp_path):
    with pytest.raises(OSError, match=r"--text-encoder"):
        models.TextEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(OSError, match=r"--image-encoder"):
        models.ImageEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--image-backend"):
        models.ImageEncoder("x", backend="keras")


def test_timm_backend_without_timm_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r"--image-backend timm needs the 'timm' package.*pip install timm.*--image-backend transformers"):
        models.ImageEncoder("vit_base_patch16_224", backend="timm")


def test_timm_backend_where_timm_imports():
    pytest.importorskip("timm", reason="timm does not import here (torchvision is missing)")
    encoder = models.ImageEncoder("resnet18", backend="timm", pretrained=False)
    transform = encoder.transform()
    z = encoder(torch.randn(2, 3, *transform.size))
    assert z.shape == (2, encoder.out_dim)


def test_mlp_head_layout():
    head = models.mlp_head(768, 256, 101)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[3].out_features, head[5].out_features) == (768, 256, 256, 101)
    with pytest.raises(ValueError, match="dropout"):
        models.mlp_head(4, 4, 2, dropout=1.0)


# ----------------------------------------------------------------------------- model, mixing, optimiser


def _batch(encoders, food, n=4):
    image_dir, text_dir = encoders
    model = models.ImageTextClassifier(models.ImageEncoder(str(image_dir)), models.TextEncoder(str(text_dir)), 4, hidden=16)
    splits = data.load_food101(food, validation_size=2)
    dataset = data.ImageTextDataset(splits.train[:n], model.image_encoder.transform())
    inputs, y = data.ImageTextCollator(models.load_tokenizer(str(text_dir)))([dataset[i] for i in range(n)])
    return model.eval(), inputs, y


def test_text_is_mixed_at_the_word_embeddings_with_merged_masks(encoders, food):
    from m3co_loss import MixupPlan

    model, (pixels, tokens), y = _batch(encoders, food)
    tokens["attention_mask"][1] = 1
    tokens["attention_mask"][0, -2:] = 0  # row 0 is shorter than its partner, row 1
    perm = torch.tensor([1, 0, 3, 2])
    plan = MixupPlan((perm, perm), torch.tensor([[0.7, 1.0, 0.3, 0.5]] * 2))
    mixed = model.mix_input(1, tokens, plan)
    assert "input_ids" not in mixed
    embeds = model.text_encoder.embed_tokens(tokens["input_ids"])
    lam = plan.lam[1].view(-1, 1, 1)
    torch.testing.assert_close(mixed["inputs_embeds"], lam * embeds + (1 - lam) * embeds[perm])
    assert mixed["attention_mask"][0, -2:].tolist() == [1, 1]  # the partner's real tokens are attended to
    torch.testing.assert_close(mixed["attention_mask"][1], tokens["attention_mask"][1])  # lam = 1: own mask
    torch.testing.assert_close(model.mix_input(0, pixels, plan), plan.mix(pixels, 0))
    with torch.no_grad():  # a row with lam = 1 encodes exactly like the clean text
        z_mixed = model.encode_mixed_modality(1, tokens, plan)
        z_clean = model.encode([pixels, tokens])[1]
    torch.testing.assert_close(z_mixed[1], z_clean[1])
    assert not torch.allclose(z_mixed[0], z_clean[0])


def test_param_groups_follow_the_released_learning_rates(encoders, food):
    import training
    from training.imagetext.pipeline import param_groups

    model, _, _ = _batch(encoders, food, n=2)
    lr = {"image_encoder": 1.0, "text_encoder": 2.0, "image_head": 3.0, "text_head": 4.0, "fusion_head": 5.0}
    groups = param_groups(model, training.TrainConfig(weight_decay=0.5, extra={"lr": lr}))
    ids = lambda module: {id(p) for p in module.parameters()}  # noqa: E731
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    assert by_lr == {1.0: ids(model.image_encoder), 2.0: ids(model.text_encoder), 3.0: ids(model.heads[0]), 4.0: ids(model.heads[1]), 5.0: ids(model.fusion)}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {id(p): n for n, p in model.text_encoder.named_parameters()}
    assert no_decay and all(names[i].endswith("bias") or "LayerNorm" in names[i] for i in no_decay)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- robustness


def test_noise_statistics_and_corrupted_evaluation(encoders, food):
    from training.imagetext.robustness import noise_statistics, robustness_report

    model, inputs, y = _batch(encoders, food, n=6)
    batches = [(inputs, y)]
    stats = noise_statistics(model, batches, device="cpu", max_samples=5)
    pixels, tokens = inputs
    torch.testing.assert_close(stats.image_mean, pixels[:5].mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.image_std, pixels[:5].permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False), atol=1e-5, rtol=0)
    with torch.no_grad():
        real = model.text_encoder.embed_tokens(tokens["input_ids"][:5])[tokens["attention_mask"][:5].bool()]
    torch.testing.assert_close(stats.text_mean, real.mean(0), atol=1e-5, rtol=0)
    assert stats.samples == 5

    generator = torch.Generator().manual_seed(0)
    noise = stats.noise("text", inputs, model, generator)
    assert noise.shape == (*tokens["input_ids"].shape, model.text_encoder.out_dim)
    report = robustness_report(model, batches, stats, device="cpu", corrupt=("image", "text"), confidence=True, seed=0)
    assert set(report) == {"acc_clean", "acc_image_noise", "acc_text_noise", "confidence_clean", "confidence_random"}
    assert all(0 <= v <= 1 for v in report.values())
    assert all(v >= 1 / 4 - 1e-6 for k, v in report.items() if k.startswith("confidence"))  # max-softmax over 4 classes
    with torch.no_grad():
        clean = torch.softmax(model.predict(inputs), 1)
    assert report["confidence_clean"] == pytest.approx(clean.max(1).values.mean().item(), abs=1e-6)
    assert report["acc_clean"] == pytest.approx((clean.argmax(1) == y).float().mean().item())
    again = robustness_report(model, batches, stats, device="cpu", corrupt=("image",), confidence=True, seed=0)
    assert again["acc_image_noise"] == report["acc_image_noise"] and again["confidence_random"] == report["confidence_random"]
    with pytest.raises(ValueError, match="--eval-corrupt"):
        robustness_report(model, batches, stats, device="cpu", corrupt=("audio",))


# ----------------------------------------------------------------------------- pipelines end to end

ANALYSES = {"acc_clean", "acc_image_noise", "acc_text_noise", "confidence_clean", "confidence_random", "epoch"}


def _check_results(out: Path, dataset: str, *, method: str = "m3col") -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == dataset and results["method"] == method and results["seeds"] == [0]
    for protocol in ("validation", "final", "best_on_test"):
        assert set(results["protocols"][protocol]["acc"]) == {"mean", "std"}
        assert 0 <= results["protocols"][protocol]["acc"]["mean"] <= 1
    assert results["protocols"]["validation"]["acc"]["mean"] > 0.5  # 4 classes: chance is 0.25
    assert set(results["analyses"]) == ANALYSES
    seed = results["per_seed"][0]
    assert seed["train_size"] > 0 and seed["test_size"] > 0 and seed["analyses"]["acc_clean"] >= 0
    assert results["config"]["extra"]["dropped_pairs"]["train"] == {"missing_image": 1, "missing_text": 1}
    assert "M3CoL (paper" in (out / "results.md").read_text()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "seed0.pt").is_file()
    return results


@pytest.mark.slow
def test_food101_smoke_command_line(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "food101.py"), "--smoke", "--output-dir", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 without image, 1 without text" in proc.stdout and "smoke run:" in proc.stdout
    results = _check_results(out, "food101")
    assert results["config"]["epochs"] == 2 and results["config"]["extra"]["smoke"] is True


def test_n24news_smoke_runs_both_phases(tmp_path, monkeypatch):
    import training
    import n24news

    phases = []
    call = training.Objective.__call__

    def recording(self, *args, **kwargs):
        phases.append(self.phase())
        return call(self, *args, **kwargs)

    monkeypatch.setattr(training.Objective, "__call__", recording)
    out = tmp_path / "out"
    n24news.main(n24news.N24NEWS, ["--smoke", "--output-dir", str(out), "--no-progress", "--text-field", "caption"])
    results = _check_results(out, "N24News")
    assert "caption" in results["config"]["extra"]["dataset_options"]
    steps = len(phases) // 2
    assert phases == ["m3co"] * steps + ["multisclip"] * steps  # M3Co for 1 of 2 epochs, then MultiSClip


def train_args(food, encoders, out):
    image_dir, text_dir = encoders
    lrs = [x for g in ("image-encoder", "text-encoder", "image-head", "text-head", "fusion-head") for x in (f"--lr-{g}", "1e-3")]
    return [
        "--data-dir", str(food), "--image-encoder", str(image_dir), "--text-encoder", str(text_dir), "--output-dir", str(out),
        "--seeds", "0", "--epochs", "2", "--batch-size", "8", "--accumulate", "2", "--validation-size", "4",
        "--num-workers", "0", "--device", "cpu", "--workers", "1", "--head-width", "16", "--max-tokens", "16", "--no-progress",
        "--eval-corrupt", "image", "--noise-samples", "8", *lrs,
    ]  # fmt: skip


class Interrupted(Exception):
    pass


def test_resume_from_a_checkpoint_continues_where_it_stopped(food, encoders, tmp_path, monkeypatch):
    import training
    import food101

    full = tmp_path / "full"
    food101.main(food101.FOOD101, train_args(food, encoders, full))

    cut = tmp_path / "cut"
    save = training.atomic_torch_save

    def save_then_stop(path, obj):
        save(path, obj)
        raise Interrupted  # the process dies right after the first epoch's checkpoint

    monkeypatch.setattr(training.checkpoint, "atomic_torch_save", save_then_stop)
    with pytest.raises(Interrupted):
        food101.main(food101.FOOD101, train_args(food, encoders, cut))
    monkeypatch.setattr(training.checkpoint, "atomic_torch_save", save)
    assert torch.load(cut / "checkpoints" / "seed0.pt", weights_only=False)["epoch"] == 0
    assert not (cut / "results.json").exists()

    epochs_run = []
    end = training.Objective.epoch_end
    monkeypatch.setattr(training.Objective, "epoch_end", lambda self: (epochs_run.append(1), end(self)))
    food101.main(food101.FOOD101, train_args(food, encoders, cut) + ["--resume"])
    assert len(epochs_run) == 1  # only the second epoch was trained again
    a = json.loads((full / "seeds" / "seed0.json").read_text())
    b = json.loads((cut / "seeds" / "seed0.json").read_text())
    # bit for bit the uninterrupted run, the analyses of the chosen epoch's weights included
    assert a["history"] == b["history"] and a["protocols"] == b["protocols"] and a["analyses"] == b["analyses"]
    assert set(a["analyses"]) == {"acc_clean", "acc_image_noise", "epoch"}


def test_command_line_errors_are_clear(food, encoders, tmp_path, monkeypatch, capsys):
    import food101

    args = train_args(food, encoders, tmp_path / "out")
    with pytest.raises(SystemExit, match="--image-backend timm needs the 'timm' package"):
        monkeypatch.setitem(sys.modules, "timm", None)
        food101.main(food101.FOOD101, args + ["--image-backend", "timm"])
    with pytest.raises(SystemExit) as stop:
        food101.main(food101.FOOD101, args + ["--lr", "0.1"])
    assert stop.value.code == 2 and "--lr is not used here: set --lr-image-encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read the configuration of --text-encoder"):
        food101.main(food101.FOOD101, args + ["--text-encoder", str(tmp_path / "no_such_bert")])
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((Path(encoders[1]) / "config.json").read_text())
    # a folder without weights: named, in one line, before or while the first seed builds its model
    with pytest.raises(SystemExit, match="cannot load a (tokenizer|text encoder) from .* \\(--text-encoder\\)"):
        food101.main(food101.FOOD101, args + ["--text-encoder", str(config_only)])
    with pytest.raises(SystemExit, match="output_dir .* is a file"):
        (tmp_path / "afile").write_text("")
        food101.main(food101.FOOD101, args[: args.index("--output-dir")] + ["--output-dir", str(tmp_path / "afile")] + args[args.index("--output-dir") + 2 :])
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("M3CO_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr("training.datadir.REPO_ROOT", tmp_path / "nowhere" / "repo")
    with pytest.raises(SystemExit, match=r"(?s)No food101 data found.*visiir.*--smoke"):
        food101.main(food101.FOOD101, ["--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"validation_size \(50\) must be smaller than the 20 usable training pairs"):
        food101.main(food101.FOOD101, args + ["--validation-size", "50"])
    (food / "texts" / "test_titles.csv").write_text("a.jpg,only two\n")
    with pytest.raises(SystemExit, match=r"food101: .*test_titles\.csv, line 1: expected 3 fields"):
        food101.main(food101.FOOD101, args)


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_an_unreadable_image_met_in_training_stops_in_one_line(food, encoders, tmp_path, num_workers):
    import food101

    splits = data.load_food101(food, validation_size=4)
    broken = splits.train[0].image
    broken.write_bytes(b"not a jpeg")
    args = train_args(food, encoders, tmp_path / "out") + ["--num-workers", num_workers]
    with pytest.raises(SystemExit) as stop:  # from the main process, or re-raised from a DataLoader worker
        food101.main(food101.FOOD101, args)
    message = str(stop.value)
    assert message.startswith(f"food101: cannot read image {broken}: ") and message.endswith("; --verify-images checks every image before training")
    assert "\n" not in message and "Traceback" not in message
