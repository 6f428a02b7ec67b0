"""Tests for MKD anomaly detection: ROC-AUC, detection and localisation on a toy task, and the CLI.

The MKD losses themselves are tested in test_losses_feature.py.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mosaic.anomaly.cli import fit_config
from mosaic.anomaly.localize import colorize, localization_maps, smooth_map
from mosaic.anomaly.mkd import MKD, build_mkd, load_mkd, save_mkd, score_images, source_targets
from mosaic.anomaly.roc import average_ranks, roc_auc
from mosaic.cli import main
from mosaic.config import ConfigError
from mosaic.engine import checkpoints, train
from mosaic.models import ModelError, create_model, save_model

SIZE = 16  # toy image side


# ----------------------------------------------------------------------------- ROC-AUC


def test_roc_auc_hand_cases_with_ties():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.875)
    assert roc_auc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1, 1])) == pytest.approx(1.0)
    assert roc_auc(torch.tensor([0.3, 0.2, 0.1]), torch.tensor([0, 1, 1])) == pytest.approx(0.0)
    assert roc_auc(torch.ones(6), torch.tensor([0, 1, 0, 1, 1, 0])) == pytest.approx(0.5)
    assert average_ranks(torch.tensor([5.0, 1.0, 5.0, 3.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_roc_auc_equals_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=gen).float()  # many ties
    labels = torch.randint(0, 2, (60,), generator=gen)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    assert roc_auc(scores, labels) == pytest.approx(float(pairs.mean()))


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="one label per score"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1]))


# ----------------------------------------------------------------------------- toy detection and localisation


def smooth_images(n: int, *, seed: int) -> torch.Tensor:
    """Normal toy images: bilinear up-sampled 4x4 colour noise (smooth), uint8 (n, 3, SIZE, SIZE)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    x = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    return (x * 255).round().to(torch.uint8)


def paste_patches(images: torch.Tensor, *, seed: int, side: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of `images` with a pixel-noise patch pasted at a random place, and the patch masks (n, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    out, masks = images.clone(), torch.zeros(len(images), SIZE, SIZE, dtype=torch.bool)
    for i in range(len(images)):
        top, left = torch.randint(1, SIZE - side - 1, (2,), generator=gen).tolist()
        noise = torch.randint(0, 256, (3, side, side), generator=gen).to(torch.uint8)
        out[i, :, top:top + side, left:left + side] = noise
        masks[i, top:top + side, left:left + side] = True
    return out, masks


def toy_pair(seed: int = 0, *, adapter: bool = False, cloner: str = "cnn_tiny") -> MKD:
    """Source: a fixed random cnn_tiny (frozen); cloner: a fresh network; critical layers layer1, layer2."""
    torch.manual_seed(seed)
    source = create_model("cnn_tiny", num_classes=3)
    clone = create_model(cloner, num_classes=1)
    layers = ["layer1", "layer2"]
    return MKD(source, clone, source_layers=layers, cloner_layers=layers, adapter=adapter,
               mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_size=SIZE)


def _source_checkpoint(folder, arch: str = "cnn_tiny"):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3)
    meta = {"arch": arch, "num_classes": 3, "in_chans": 3, "image_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_model(model, folder / "model.safetensors", meta=meta)
    return folder


def _write_pngs(folder, images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def fitted_pair(tmp_path_factory) -> MKD:
    """The toy pair's source, with a cloner fitted 150 steps on smooth images by `mosaic anomaly fit` (the engine)."""
    root = tmp_path_factory.mktemp("fitted")
    source = _source_checkpoint(root / "source")  # the same network as toy_pair(0)'s source
    _write_pngs(root / "normal", smooth_images(160, seed=1))
    results = train(fit_config([f"source={source}", f"data={root / 'normal'}", f"out={root / 'pair'}", "layers=layer1,layer2",
                                "cloner_layers=layer1,layer2", "epochs=30", "batch_size=32", "lr=3e-3", "cpu=true",
                                "progress=false", "cache=false", "log_every=1"]))
    losses = [json.loads(line)["loss"] for line in (root / "pair" / "metrics.jsonl").read_text().splitlines()]
    assert results["steps"] == 150 and losses[-1] < losses[0]
    return load_mkd(root / "pair")


def test_pasted_patch_scores_higher_than_clean(fitted_pair):
    clean = smooth_images(48, seed=2)
    patched, _ = paste_patches(clean, seed=3)
    scores = score_images(fitted_pair, torch.cat([clean, patched]))
    labels = torch.cat([torch.zeros(48), torch.ones(48)])
    assert roc_auc(scores, labels) > 0.95
    assert bool((scores[48:] > scores[:48]).float().mean() > 0.9)  # pairwise: same image with and without the patch


def test_precomputed_targets_give_the_same_scores(fitted_pair):
    images = smooth_images(10, seed=4)
    shared = source_targets(fitted_pair, images)
    assert torch.allclose(score_images(fitted_pair, images), score_images(fitted_pair, images, targets=shared))


def test_localisation_peaks_inside_the_patch(fitted_pair):
    patched, masks = paste_patches(smooth_images(24, seed=5), seed=6)
    maps = localization_maps(fitted_pair, patched, reduce="sum", sigma=1.0, opening=3)
    assert maps.shape == (24, SIZE, SIZE)
    peaks = maps.flatten(1).argmax(1)
    inside = masks.flatten(1)[torch.arange(24), peaks]
    assert float(inside.float().mean()) >= 0.8
    assert roc_auc(maps, masks) > 0.85
    assert localization_maps(fitted_pair, patched[:2], reduce="max").shape == (2, SIZE, SIZE)


def test_smoothing_and_colour_map():
    spike = torch.zeros(1, 9, 9)
    spike[0, 4, 4] = 1.0
    assert float(smooth_map(spike, sigma=0, opening=3).abs().max()) == 0.0  # opening removes a lone pixel
    blurred = smooth_map(spike, sigma=1.0, opening=0)
    assert blurred.shape == spike.shape and float(blurred.sum()) == pytest.approx(1.0, abs=1e-5)
    rgb = colorize(torch.tensor([[[0.0, 0.5, 1.0]]]))
    assert rgb.shape == (1, 3, 1, 3)
    assert rgb[0, :, 0, 0].tolist() == [0.0, 0.0, 0.5]  # low: dark blue
    assert rgb[0, :, 0, 2].tolist() == [0.5, 0.0, 0.0]  # high: dark red
    assert rgb[0, 1, 0, 1] == 1.0  # middle: green


# ----------------------------------------------------------------------------- pair construction


def test_channel_mismatch_needs_an_adapter():
    with pytest.raises(ModelError, match="adapter=true"):
        toy_pair(cloner="cnn_small")
    mkd = toy_pair(cloner="cnn_small", adapter=True)
    assert mkd(torch.rand(2, 3, SIZE, SIZE)).shape == (2,)


def test_build_save_load_round_trip_with_adapters(tmp_path):
    source = _source_checkpoint(tmp_path / "source", "cnn_small")
    with pytest.raises(ModelError, match="spatial size"):  # cnn_small's layer3 (2x2) has no cnn_tiny counterpart
        build_mkd(source, cloner="cnn_tiny")
    mkd = build_mkd(source, cloner="cnn_tiny", layers="layer1,layer2", adapter=True, lambda_dir=0.1)
    assert mkd.source_layers == ["layer1", "layer2"] and mkd.cloner_layers == ["layer1", "layer2"]
    for p in mkd.adapters.parameters():
        torch.nn.init.normal_(p)
    save_mkd(mkd, tmp_path / "pair", options={"note": "test"})
    again = load_mkd(tmp_path / "pair")
    images = smooth_images(4, seed=7)
    assert torch.allclose(score_images(mkd, images), score_images(again, images))
    assert again.lambda_dir == 0.1 and json.loads((tmp_path / "pair" / "mkd.json").read_text())["options"]


# ----------------------------------------------------------------------------- CLI


def test_cli_fit_and_score_round_trip(tmp_path, capsys):
    source = _source_checkpoint(tmp_path / "source")
    _write_pngs(tmp_path / "normal", smooth_images(32, seed=8))
    clean = smooth_images(8, seed=9)
    patched, masks = paste_patches(smooth_images(8, seed=10), seed=11)
    _write_pngs(tmp_path / "test" / "good", clean)
    _write_pngs(tmp_path / "test" / "patch", patched)
    for name, m in (("good", torch.zeros(8, SIZE, SIZE, dtype=torch.bool)), ("patch", masks)):
        (tmp_path / "masks" / name).mkdir(parents=True)
        for i, mask in enumerate(m):
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(tmp_path / "masks" / name / f"{i:03d}.png")
    out = tmp_path / "pair"
    fit_args = ["anomaly", "fit", f"source={source}", f"data={tmp_path / 'normal'}", f"out={out}", "epochs=4",
                "batch_size=8", "cpu=true", "progress=false", "cache=false"]
    assert main(fit_args) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["images"] == 32 and fitted["steps"] == 16
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    record = json.loads((out / "mkd.json").read_text())
    assert record["source_layers"] == ["layer1", "layer2"] and record["options"]["epochs"] == 4

    assert main(["anomaly", "score", str(out), f"data={tmp_path / 'test'}", f"masks={tmp_path / 'masks'}",
                 "heatmaps=4", "cpu=true", "cache=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 16 and result["anomalous"] == 8  # class 'good' is the normal one
    assert 0.0 <= result["auroc"] <= 1.0 and 0.0 <= result["pixel_auroc"] <= 1.0
    rows = list(csv.DictReader((out / "scores" / "scores.csv").open()))
    assert len(rows) == 16 and rows[0]["class"] == "good" and rows[0]["anomalous"] == "0"
    assert rows[-1]["anomalous"] == "1" and float(rows[-1]["score"]) > 0
    assert (out / "scores" / "heatmaps.png").is_file() and (out / "scores" / "metrics.json").is_file()

    assert main(fit_args) == 2  # the output folder exists
    assert "already exists" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    source = _source_checkpoint(tmp_path / "source")
    (tmp_path / "empty").mkdir()
    assert main(["anomaly", "fit", f"source={source}", f"data={tmp_path / 'empty'}", f"out={tmp_path / 'o'}",
                 "cpu=true", "progress=false", "cache=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no image files" in err and len(err.strip().splitlines()) == 1
    assert main(["anomaly", "fit", f"source={source}", "epoch=3"]) == 2
    assert "did you mean epochs" in capsys.readouterr().err
    assert main(["anomaly", "score", str(tmp_path / "nowhere"), "data=x"]) == 2
    assert "not an MKD folder" in capsys.readouterr().err


def test_cli_options_layer_defaults_yaml_then_key_value(tmp_path):
    from mosaic.anomaly.method import MKDFit
    from mosaic.config import ConfigError

    path = tmp_path / "fit.yaml"
    path.write_text("epochs: 7\nlr: 0.01\ncloner: cnn_small\n")
    cfg = fit_config([str(path), "lr=0.002", "source=s.safetensors"])
    assert (cfg["epochs"], cfg["mkd"]["lr"], cfg["student"]["arch"]) == (7, 0.002, "cnn_small")  # file, then key=value
    assert cfg["mkd"]["lambda_dir"] == MKDFit.defaults["lambda_dir"]  # untouched default
    path.write_text("epoch: 7\n")
    with pytest.raises(ConfigError, match="did you mean epochs"):
        fit_config([str(path), "source=s.safetensors"])
    with pytest.raises(ConfigError, match="unexpected argument 'fit.txt'"):
        fit_config(["fit.txt"])


# ----------------------------------------------------------------------------- the engine run: class filter, ROC-AUC, resume


def test_train_classes_keep_exactly_that_class(tiny_task):
    from mosaic.cli import _resolve
    from mosaic.data import load_split

    def train_set(**extra):
        items = {"data.train": tiny_task["task"], "data.image_size": 16, "data.cache": False, **extra}
        return load_split(_resolve([f"{k}={v}" for k, v in items.items()]), "train")

    everything = train_set()
    for spec, wanted in (("class_1", [1]), ("2", [2]), ("[class_0, 2]", [0, 2])):
        kept = train_set(**{"data.train_classes": spec})
        expected = torch.isin(everything.labels, torch.tensor(wanted))
        assert len(kept) == int(expected.sum()) and sorted(set(kept.labels.tolist())) == wanted
        assert torch.equal(kept.images, everything.images[expected])  # the same images, in the same order
        assert kept.classes == everything.classes  # labels still index the full class list
    limited = train_set(**{"data.train_classes": "class_1", "data.train_limit": 5})
    assert len(limited) == 5 and set(limited.labels.tolist()) == {1}  # the limit counts images of that class


def test_ood_classes_keep_those_class_folders_of_the_pool_unlabelled(tiny_task):
    """data.ood_classes: a labelled source used as a pool of only those classes (a 'far' pool), still unlabelled."""
    from mosaic.cli import _resolve
    from mosaic.config import ConfigError
    from mosaic.data import DataError, load_split

    def pool(**extra):
        items = {"data.ood": tiny_task["task"], "data.image_size": 16, "data.cache": False, **extra}
        return load_split(_resolve([f"{k}={v}" for k, v in items.items()]), "ood")

    labelled = load_split(_resolve([f"data.train={tiny_task['task']}", "data.image_size=16", "data.cache=false"]),
                          "train")
    everything = pool()
    assert everything.labels is None and torch.equal(everything.images, labelled.images)
    kept = pool(**{"data.ood_classes": "[class_0, 2]"})
    wanted = torch.isin(labelled.labels, torch.tensor([0, 2]))
    assert kept.labels is None and kept.classes is None  # used as unlabelled images downstream
    assert torch.equal(kept.images, labelled.images[wanted])  # exactly those classes' images, in order
    limited = pool(**{"data.ood_classes": "[class_0, class_2]", "data.ood_limit": 4})
    assert len(limited) == 4  # the limit counts images of those classes
    with pytest.raises(DataError, match="has no classes"):  # a flat, unlabelled pool has no class folders
        pool(**{"data.ood": tiny_task["ood"], "data.ood_classes": "class_0"})
    with pytest.raises(DataError, match="no class 'dog'.*class_0, class_1, class_2"):
        pool(**{"data.ood_classes": "dog"})
    with pytest.raises(ConfigError, match="'data.ood_classes' must be a class name or index"):
        pool(**{"data.ood_classes": "[]"})


def test_unknown_normal_class_is_one_error_line(tiny_task, tiny_teacher, tmp_path, capsys):
    args = ["anomaly", "fit", f"source={tiny_teacher}", f"data={tiny_task['task']}", f"out={tmp_path / 'r'}",
            "cpu=true", "progress=false", "cache=false"]
    assert main([*args, "normal_class=dog"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no class 'dog'") and "class_0, class_1, class_2" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    assert main([*args, "normal_class=[]"]) == 2
    err = capsys.readouterr().err
    assert "data.train_classes" in err and len(err.strip().splitlines()) == 1


def test_run_reports_the_roc_auc_of_its_scores(tiny_task, tiny_teacher, tmp_path):
    """`mosaic distill method=mkd` with data.test: results.json's auroc is roc.py's on load_mkd's scores."""
    from conftest import base_overrides
    from mosaic.cli import _resolve
    from mosaic.data import load_image_set

    cfg = _resolve(base_overrides(tiny_task, tmp_path, teacher=str(tiny_teacher), method="mkd", name="r", steps=6,
                                  **{"student.arch": "cnn_tiny", "data.train_classes": "class_1", "mkd.adapter": True}))
    results = train(cfg)
    assert "student_top1" not in results and results["images"]["train"] == 24
    test = load_image_set(str(tiny_task["task"]), split="test", image_size=16, cache=False)
    scores = score_images(load_mkd(tmp_path / "r"), test.images)
    assert results["auroc"] == pytest.approx(roc_auc(scores, test.labels != 1), abs=1e-12)
    logged = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == {"step": 6, "eval/auroc": results["auroc"]}
    no_normal = base_overrides(tiny_task, tmp_path, teacher=str(tiny_teacher), method="mkd", name="r2", steps=1,
                               **{"student.arch": "cnn_tiny", "mkd.adapter": True})
    with pytest.raises(ConfigError, match="does not say which images are normal"):
        train(_resolve(no_normal))
    assert not (tmp_path / "r2").exists()


def test_killed_fit_resumes_to_the_same_cloner(tiny_task, tiny_teacher, tmp_path):
    """SIGKILL mid-fit, resume=true: the cloner and adapters end bit-identical to an uninterrupted fit."""
    import signal

    from safetensors.torch import load_file
    from test_reliability import final_losses, launch, same_weights, wait_for_checkpoint

    args = [f"source={tiny_teacher}", f"data={tiny_task['task']}", "normal_class=class_1", f"test={tiny_task['task']}",
            "adapter=true", "epochs=100", "batch_size=8", "ckpt_every=10", "log_every=10", "cpu=true",
            "progress=false", "cache=false"]  # 24 normal images: 300 steps
    killed = launch([*args, f"out={tmp_path / 'killed'}"], command=("anomaly", "fit"))
    wait_for_checkpoint(tmp_path / "killed", 30, killed)
    killed.send_signal(signal.SIGKILL)
    out = killed.communicate(timeout=120)[0]
    assert killed.returncode != 0, f"the fit finished before the kill:\n{out}"
    last = int(checkpoints(tmp_path / "killed")[-1].name.split("_")[1])
    assert 30 <= last < 300
    resumed = launch([*args, f"out={tmp_path / 'killed'}", "resume=true"], command=("anomaly", "fit"))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert f"resumed {tmp_path / 'killed'} from step {last}" in out
    train(fit_config([*args, f"out={tmp_path / 'full'}"]))  # uninterrupted, in this process (also one thread)
    assert same_weights(tmp_path / "full", tmp_path / "killed")
    full, again = (load_file(tmp_path / run / "adapters.safetensors") for run in ("full", "killed"))
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
    assert final_losses(tmp_path / "full") == final_losses(tmp_path / "killed")
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("full", "killed")]
    assert results[0]["auroc"] == results[1]["auroc"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in x]
    assert steps == list(range(10, 301, 10))  # nothing duplicated or missing across the kill


def test_unreached_cloner_parameters_are_frozen():
    """Only the critical layers' path trains: cnn_tiny's head (and, pairing layer1 only, layer2) get no gradient."""
    from mosaic.anomaly.method import Cloner, freeze_unreached

    torch.manual_seed(0)
    source, clone = create_model("cnn_tiny", num_classes=3), create_model("cnn_tiny", num_classes=3)
    pair = MKD(source, clone, source_layers=["layer1"], cloner_layers=["layer1"], adapter=True,
               mean=(0.5,) * 3, std=(0.25,) * 3, image_size=SIZE)
    player = Cloner(pair)
    assert not any(n.startswith("_pair") or n.startswith("source") for n, _ in player.named_parameters())
    freeze_unreached(player, image_size=SIZE, in_chans=3, device=torch.device("cpu"))
    trainable = {n.split(".")[1] for n, p in player.named_parameters() if p.requires_grad}
    assert trainable == {"stem", "layer1", "0"}  # cloner.stem, cloner.layer1, adapters.0
    assert player.training and not source.training


def test_two_processes_fit_one_cloner(tiny_task, tiny_teacher, tmp_path):
    """Under DDP (two processes over gloo) a fit runs through: no parameter is left without a gradient."""
    from test_distributed import launch2

    launch2(fit_config([f"source={tiny_teacher}", f"data={tiny_task['task']}", "normal_class=class_1", "steps=3",
                        "epochs=null", "batch_size=4", "cpu=true", "progress=false", "cache=false",
                        f"out={tmp_path / 'ddp'}"]))
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["processes"] == 2 and results["global_batch"] == 8 and results["steps"] == 3
    assert load_mkd(tmp_path / "ddp").cloner_layers == ["layer1", "layer2"]
