"""The released image-text recipe (``--recipe released``): the released Food-101 layout, its defaults, end to end.

Generated data in the released layout and tiny random encoders (fixtures in ``conftest.py``).
"""

from __future__ import annotations

import json

import pytest
import torch

from training.imagetext import data  # noqa: E402
from training.imagetext import smoke  # noqa: E402

pytest.importorskip("transformers")
from test_imagetext import train_args  # noqa: E402



def test_released_layout_reads_texts_txt_reduced_to_letters_and_holds_out_as_random_split_does(food):
    from training.imagetext import food101 as released

    splits = released.load_food101_released(food, validation_size=4, split_seed=0)
    assert len(splits.train) == 16 and len(splits.validation) == 4 and len(splits.test) == 12  # complete pairs only
    assert splits.classes == smoke.FOOD_CLASSES
    rows, _ = released.read_food101_released_split(food, "train")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    # train in the permuted order (the released loop does not shuffle), the hold-out its last 4
    assert [s.image for s in splits.train + splits.validation] == [rows[i][0] for i in order]
    sample = splits.train[0]
    raw = (food / "texts_txt" / sample.image.parent.name / sample.image.with_suffix(".txt").name).read_text()
    assert "#" in raw and "100%" in raw and sample.text == released.letters_only(raw)
    assert sample.text == sample.text.lower() and all(w.isalpha() for w in sample.text.split()) and "recipe" in sample.text
    assert released.letters_only("Apple-Pie: a b c d, 42 e!") == "apple pie b d"  # lone letters between blanks go, matched left to right without overlap


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda root: (root / "texts_txt" / "sushi" / "sushi_1.txt").unlink(), r"text file not found: .*texts_txt/sushi/sushi_1\.txt"),
        (lambda root: (root / "texts_txt" / "sushi" / "sushi_1.txt").write_text("!! 42 ..\n"), r"sushi_1\.txt: no word of letters"),
        (lambda root: (root / "texts_txt" / "sushi" / "sushi_1.txt").write_bytes(b"\xff\xfe\xfa"), r"sushi_1\.txt is not valid UTF-8"),
        (lambda root: (root / "images" / "train" / "sushi" / "sushi_1.jpg").unlink(), r"train\.csv, line \d+: image file not found: .*sushi_1\.jpg"),
        (lambda root: (root / "train.csv").write_text("image,text,class\n"), r"train\.csv, line 1: expected the header id,text,annotation,label"),
        (lambda root: (root / "train.csv").write_text("id,text,annotation,label\nsushi_1.jpg,x,sushi\n"), r"train\.csv, line 2: expected 4 fields"),
        (lambda root: (root / "train.csv").write_text("id,text,annotation,label\nsushi_1.jpg,x,sushi,one\n"), r"train\.csv, line 2: label 'one' is not a class index"),
        (lambda root: (root / "train.csv").write_text(""), r"train\.csv is empty"),
        (lambda root: (root / "test.csv").unlink(), r"Food-101 test pairs not found: .*test\.csv"),
        (lambda root: (root / "test.csv").write_text("id,text,annotation,label\nsushi_0.jpg,x,sushi,3\n"), r"test\.csv: label 3 \('sushi'\) is not a class"),
    ],
)
def test_released_layout_names_the_bad_file(food, edit, message):
    from training.imagetext import food101 as released

    edit(food)
    with pytest.raises(data.DataError, match=message):
        released.load_food101_released(food, validation_size=4)


def test_recipe_defaults_follow_the_released_code():
    import food101
    import n24news

    for module, spec, min_epoch in ((food101, food101.FOOD101, 2), (n24news, n24news.N24NEWS, 1)):
        from training.imagetext import pipeline as imagetext_pipeline

        released = imagetext_pipeline.parse(spec, ["--recipe", "released", "--output-dir", "x"])
        package = imagetext_pipeline.parse(spec, ["--output-dir", "x"])
        assert released.image_encoder == "google/vit-base-patch16-224" and package.image_encoder == "google/vit-base-patch16-224-in21k"
        assert (released.seeds, released.eval_batch_size, released.valid_step, released.min_epoch) == ([0], 32, 50, min_epoch)
        assert (package.seeds, package.eval_batch_size, package.valid_step, package.min_epoch) == ([0, 1, 2], 128, None, None)
    assert food101.layout(imagetext_pipeline.parse(food101.FOOD101, ["--recipe", "released", "--output-dir", "x"])) == "released"


def test_food101_released_recipe_end_to_end(food, encoders, tmp_path):
    import food101

    out = tmp_path / "out"
    args = train_args(food, encoders, out) + ["--recipe", "released", "--valid-step", "1", "--min-epoch", "0", "--eval-batch-size", "4"]
    results = food101.main(food101.FOOD101, args)
    config = results["config"]
    assert config["epochs"] == 3 and config["bf16"] is False and config["extra"]["recipe"] == "released"
    assert config["extra"]["released"] == {"num_epoch": 2, "valid_step": 1, "min_epoch": 0}
    assert config["extra"]["dataset_options"].startswith("layout released")
    record = json.loads((out / "seeds" / "seed0.json").read_text())
    # 16 training pairs in micro-batches of 8, an optimiser step every 2: a validation every 2 micro-batches past epoch 0
    assert record["history"]["step"] == [4, 6] and record["history"]["epoch"] == [1, 2] and record["validations"] == 2
    assert record["protocols"]["validation"]["acc"] == record["history"]["test_acc"][-1]
    assert record["test_size"] == 12 and set(record["analyses"]) == {"acc_clean", "acc_image_noise", "epoch"}
    assert "The released training loop" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recipe", "released", "--bf16"], "--recipe released: --bf16 does not apply"),
        (["--recipe", "released", "--scheduler", "step"], "--recipe released: --scheduler step does not apply"),
        (["--recipe", "released", "--test-every", "2"], "--recipe released: --test-every does not apply"),
        (["--valid-step", "3"], "--recipe package: --valid-step belongs to --recipe released"),
        (["--recipe", "released"], "--recipe released: with 16 training pairs, --valid-step 50 and --min-epoch 2, the loop would never validate"),
    ],
)
def test_released_recipe_refuses_what_it_cannot_honour_in_one_line(food, encoders, tmp_path, extra, message):
    import food101

    with pytest.raises(SystemExit) as stop:
        food101.main(food101.FOOD101, train_args(food, encoders, tmp_path / "out") + extra)
    assert message in str(stop.value) and "\n" not in str(stop.value)
    assert not (tmp_path / "out" / "results.json").exists()


def test_released_recipe_sets_a_corrupt_checkpoint_aside_when_asked(tmp_path, capsys):
    """--recipe released reads its checkpoint as the engine does: --set-aside-corrupt applies."""
    import food101

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    corrupt = out / "checkpoints" / "seed0.pt"
    corrupt.write_bytes(b"garbage\n")
    args = ["--smoke", "--recipe", "released", "--seeds", "0", "--output-dir", str(out), "--workers", "1", "--no-progress", "--resume"]
    with pytest.raises(SystemExit) as stop:
        food101.main(food101.FOOD101, args)
    assert f"{corrupt}: corrupt checkpoint" in str(stop.value) and "\n" not in str(stop.value)
    results = food101.main(food101.FOOD101, args + ["--set-aside-corrupt"])
    assert results["seeds"] == [0]
    assert len(list((out / "checkpoints").glob("seed0.pt.corrupt-*"))) == 1
    assert json.loads((out / "seeds" / "seed0.json").read_text())["resumed_at_epoch"] is None
    assert "set aside the corrupt checkpoint" in capsys.readouterr().out


def test_recipe_help_lists_what_the_released_recipe_does_not_copy():
    from training import recipes
    from training.imagetext import pipeline as imagetext_pipeline

    import food101

    text = " ".join(imagetext_pipeline.build_parser(food101.FOOD101).format_help().split())
    assert "Not copied: " in text and all(" ".join(item.what.split()) in text for item in recipes.IMAGETEXT_NOT_COPIED)
