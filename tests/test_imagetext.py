"""Image-text reproductions (examples/food101.py, examples/n24news.py): readers, encoders, smoke runs.

Everything runs on generated data in the released layouts and on tiny random encoders saved
with ``save_pretrained``; nothing touches the network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import imagetext_data as data  # noqa: E402
import imagetext_smoke as smoke  # noqa: E402

transformers = pytest.importorskip("transformers")
import imagetext_models as models  # noqa: E402


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return smoke.make_tiny_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture
def food(tmp_path):
    return smoke.make_food101(tmp_path / "food101", per_class={"train": 5, "test": 3})


@pytest.fixture
def news(tmp_path):
    return smoke.make_n24news(tmp_path / "n24news", per_class={"train": 5, "dev": 2, "test": 3})


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
    batch = data.ImageTextCollator(tokenizer, max_tokens=5)([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] <= 5 and (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    image_encoder.eval(), text_encoder.eval()
    with torch.no_grad():
        z_img = image_encoder(batch["pixel_values"])
        z_txt = text_encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        full = text_encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        by_embeds = text_encoder(inputs_embeds=text_encoder.embed_tokens(batch["input_ids"]), attention_mask=batch["attention_mask"])
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
        torch.testing.assert_close(encoder(inputs_embeds=encoder.embed_tokens(ids), attention_mask=mask), encoder(ids, mask))


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
