import json
import shutil
from dataclasses import replace

import pytest
import torch

from training import compare, engine
from training.data import normalize, stratified_split
from training.engine import pick_device
from training.models import get_spec
from training.train import TrainConfig, build_parser, load_data, main, train
from utils import UserError, parse_config


def cfg_for(tmp_path, synthetic_dir, **kw) -> TrainConfig:
    base = TrainConfig(model="efficientnet_lite0", weights="imagenet", strategy="frozen", input_size=64,
                       dataset="cifar10", data_dir=str(synthetic_dir), download=False, epochs=2, batch_size=32,
                       lr=1e-2, runs_dir=str(tmp_path / "runs"), name="t", threads=2)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_dir):
    tmp = tmp_path_factory.mktemp("run")
    metrics = train(cfg_for(tmp, synthetic_dir))
    return tmp / "runs" / "t", metrics


def test_two_epoch_run_learns_and_writes_every_output(finished_run):
    run_dir, m = finished_run
    assert m["test_accuracy"] > 0.5  # chance is 0.1
    assert m["synthetic"] is True and m["dataset"] == "synthetic-cifar10"
    assert m["feature_cache"] is True and m["weights"].startswith("imagenet")
    for f in ("best.pt", "last.pt", "metrics.json", "model.json", "curves.png", "confusion.png", "samples.png"):
        assert (run_dir / f).stat().st_size > 0, f
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("history", "test_macro_precision", "test_macro_recall", "test_macro_f1", "per_class_accuracy",
                "confusion_matrix", "train_seconds", "device", "params_total", "params_trainable", "flops"):
        assert key in saved, key
    assert len(saved["history"]) == 2
    assert {"train_loss", "val_loss", "train_acc", "val_acc", "lr", "seconds"} <= set(saved["history"][0])
    assert saved["params_trainable"] == 1280 * 10 + 10 < saved["params_total"]
    assert sum(map(sum, saved["confusion_matrix"])) == saved["num_test"]
    mj = json.loads((run_dir / "model.json").read_text())
    pre = mj["preprocessing"]
    assert pre["input_size"] == 64 and pre["image_size"] == 32
    assert pre["classes"] == mj["classes"] and len(pre["mean"]) == 3
    assert set(pre) == {"image_size", "input_size", "mean", "std", "classes"}  # what service.preprocessing reads
    assert mj["synthetic"] is True and mj["checkpoint"] == "best.pt"


def test_rerun_without_resume_refuses_to_overwrite(finished_run, tmp_path):
    run_dir, _ = finished_run
    cfg = TrainConfig(runs_dir=str(run_dir.parent), name="t")
    with pytest.raises(UserError, match="--resume"):
        train(cfg)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, synthetic_dir, monkeypatch, ema_decay):
    cfg = cfg_for(tmp_path, synthetic_dir, epochs=3, name="straight", ema_decay=ema_decay)
    straight = train(cfg)

    original, calls = engine.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C during the third epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, name="resumed"))
    monkeypatch.setattr(engine, "train_one_epoch", original)
    resumed = train(replace(cfg, name="resumed", resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert resumed["test_accuracy"] == pytest.approx(straight["test_accuracy"])
    assert train(replace(cfg, name="resumed", resume=True)) == resumed  # finished: a no-op
    with pytest.raises(UserError, match="strategy='frozen', not 'full'"):
        train(replace(cfg, name="resumed", resume=True, strategy="full"))


def test_ema_averages_with_warmup_and_ships_the_average(tmp_path, synthetic_dir):
    net = torch.nn.Linear(2, 1)
    ema = engine.EMA(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # first update: decay min(0.5, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, d * start + (1 - d) * torch.ones_like(start))
    assert not ema.module.weight.requires_grad

    kw = dict(model="scratch_cnn", weights="none", input_size=None, strategy="full", epochs=2, lr=1e-3)
    m = train(cfg_for(tmp_path, synthetic_dir, name="ema", ema_decay=0.9, **kw))
    last = torch.load(tmp_path / "runs" / "ema" / "last.pt", weights_only=False)
    best = torch.load(tmp_path / "runs" / "ema" / "best.pt", weights_only=False)
    assert last["ema"]["updates"] == 2 * -(-m["num_train"] // 32)  # one update per step
    shipped = last["ema"]["module"] if best["epoch"] == 2 else None
    if shipped is not None:  # the best epoch is the last: best.pt holds the average, not the raw weights
        for k, v in best["model"].items():
            torch.testing.assert_close(v, shipped[k])
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"]
               if best["model"][k].dtype.is_floating_point)


def test_cpu_amp_trains_in_bf16_and_scores_in_float32(tmp_path, synthetic_dir, monkeypatch):
    seen = {"train": [], "eval": []}
    real_step, real_eval = engine.train_one_epoch, engine.evaluate
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: seen["train"].append(k["amp"]) or real_step(*a, **k))
    monkeypatch.setattr(engine, "evaluate", lambda m, d, dev, amp, **k: seen["eval"].append(amp) or
                        real_eval(m, d, dev, amp, **k))
    train(cfg_for(tmp_path, synthetic_dir, name="bf16", model="scratch_cnn", weights="none", input_size=None,
                  strategy="full", epochs=1, cpu_amp=True, device="cpu"))
    assert seen["train"] == [True] and seen["eval"] == [False, False]  # validation, then test


def test_cached_features_match_uncached_training(tmp_path, synthetic_dir):
    # a backbone with BatchNorm and dropout (both off when frozen), and a head with dropout and BatchNorm
    kw = dict(model="scratch_cnn", weights="none", input_size=None, head="gap_dropout_dense_bn")
    cached = train(cfg_for(tmp_path, synthetic_dir, name="cached", cache_features="on", **kw))
    plain = train(cfg_for(tmp_path, synthetic_dir, name="plain", cache_features="off", **kw))
    assert cached["feature_cache"] and not plain["feature_cache"]
    for a, b in zip(cached["history"], plain["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)


def test_cache_refused_with_augmentation(tmp_path, synthetic_dir):
    with pytest.raises(UserError, match="augmentation"):
        train(cfg_for(tmp_path, synthetic_dir, cache_features="on", augment="crop"))


def test_train_fraction_subsamples_each_class_and_keeps_the_validation_split(finished_run, tmp_path, synthetic_dir):
    whole = finished_run[1]
    half = train(cfg_for(tmp_path, synthetic_dir, name="half", train_fraction=0.5, cache_features="on", epochs=1))
    assert half["num_val"] == whole["num_val"] and half["num_test"] == whole["num_test"]
    assert abs(half["num_train"] - whole["num_train"] / 2) <= 10  # per class, rounded: 10 classes
    with pytest.raises(UserError, match="--train-fraction"):
        train(cfg_for(tmp_path, synthetic_dir, name="none", train_fraction=0.0))


def test_last_n_with_augmentation_trains(tmp_path, synthetic_dir):
    m = train(cfg_for(tmp_path, synthetic_dir, strategy="last-5", epochs=1, augment="crop,flip", lr=1e-3,
                      limit_train=128, limit_test=40, name="lastn"))
    assert not m["feature_cache"] and m["augment"] == ["crop", "flip"]
    assert m["params_trainable"] > 1290


def test_two_phase_switches_phase(tmp_path, synthetic_dir):
    m = train(cfg_for(tmp_path, synthetic_dir, model="scratch_cnn", weights="none", input_size=None,
                      strategy="two-phase", epochs=2, phase1_epochs=1, limit_train=96, name="two"))
    assert [h["phase"] for h in m["history"]] == ["frozen", "full"]
    assert m["history"][1]["lr"] == pytest.approx(m["history"][0]["lr"] * 0.1, rel=0.5)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, synthetic_dir):
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="corrupt checkpoint .*last.pt"):
        train(cfg_for(tmp_path, synthetic_dir, resume=True))


def test_cli_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["--model", "resnet51"]) == 2
    err = capsys.readouterr().err
    assert "efficientnet_lite0" in err and "Traceback" not in err
    assert main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--no-download",
                 "--runs-dir", str(tmp_path)]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["--strategy", "half"]) == 2
    assert "last-N" in capsys.readouterr().err


def test_cli_list_models(capsys):
    assert main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "(offline)" in out and "resnet50" in out


def test_compare_writes_table_and_chart(finished_run, tmp_path):
    run_dir, m = finished_run
    assert compare.main([str(run_dir), str(tmp_path / "missing"), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp.md").read_text()
    assert "SYNTHETIC" in md and f"{m['test_accuracy']:.4f}" in md
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert compare.main([str(tmp_path / "missing")]) == 2


def test_device_auto_follows_cuda_and_cuda_without_gpu_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert main(["--device", "cuda", "--runs-dir", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(UserError, match="valid: auto, cpu"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_cli_flags_and_yaml_defaults(tmp_path):
    yaml_file = tmp_path / "study.yaml"
    yaml_file.write_text("train:\n  epochs: 7\n  model: scratch_cnn\nexport:\n  formats: [fp32]\n")
    argv = ["--config", str(yaml_file), "--model", "resnet50", "--no-amp", "--no-download", "--resume",
            "--synthetic-fallback", "--early-stopping", "3", "--phase1-epochs", "2", "--head", "mlp256"]
    cfg, _ = parse_config(TrainConfig, build_parser(), argv, section="train")
    assert cfg == TrainConfig(model="resnet50", epochs=7, amp=False, download=False, resume=True,
                              synthetic_fallback=True, early_stopping=3, phase1_epochs=2, head="mlp256")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, build_parser(), ["--optimizer", "lion"])


def test_synthetic_fallback_is_loud(tmp_path, capsys):
    cfg = TrainConfig(model="scratch_cnn", weights="none", strategy="full", dataset="cifar10",
                      data_dir=str(tmp_path / "empty"), download=False, synthetic_fallback=True, epochs=1,
                      limit_train=64, limit_test=20, runs_dir=str(tmp_path / "runs"), name="fb")
    m = train(cfg)
    err = capsys.readouterr().err
    assert "--synthetic-fallback" in err and "SYNTHETIC" in err
    assert m["synthetic"] and m["dataset"] == "synthetic-cifar10"


def test_distill_loss_is_zero_at_the_teacher_and_scaled_by_t_squared():
    torch.manual_seed(0)
    t = torch.randn(8, 10)
    assert engine.distill_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10, requires_grad=True)
    loss = engine.distill_loss(s, t, 1.0)
    p, q = t.softmax(1), s.log_softmax(1)
    assert loss.item() == pytest.approx((p * (p.log() - q)).sum(1).mean().item(), rel=1e-5)
    loss.backward()  # the gradient pulls the student's probabilities towards the teacher's
    torch.testing.assert_close(s.grad, (s.softmax(1) - p).detach() / 8)


def test_second_stage_starts_from_a_run_and_distills_from_its_teacher(tiny_run, tmp_path, synthetic_dir,
                                                                      monkeypatch):
    base = json.loads((tiny_run / "metrics.json").read_text())["config"]
    cfg = TrainConfig(**{**base, "runs_dir": str(tmp_path / "runs"), "name": "robust", "epochs": 1, "lr": 1e-4,
                         "augment": "jpeg", "serving_aug_p": 1.0, "init_from": str(tiny_run),
                         "teacher": str(tiny_run), "distill_weight": 1.0})
    temperatures, calls = [], {"student": [], "teacher": []}
    real_loss, real_epoch = engine.distill_loss, engine.train_one_epoch
    monkeypatch.setattr(engine, "distill_loss", lambda s, t, temp: temperatures.append(temp) or real_loss(s, t, temp))

    class Seen(torch.nn.Module):  # records what a model is given
        def __init__(self, inner, key):
            super().__init__()
            self.inner, self.key = inner, key

        def forward(self, x):
            calls[self.key].append(x.detach().clone())
            return self.inner(x)

    def epoch(model, *a, teacher=None, **k):
        calls["start"] = {n: v.clone() for n, v in model.state_dict().items()}
        assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
        return real_epoch(Seen(model, "student"), *a, teacher=Seen(teacher, "teacher"), **k)

    monkeypatch.setattr(engine, "train_one_epoch", epoch)
    m = train(cfg)
    for k, v in torch.load(tiny_run / "best.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(calls["start"][k], v)  # the second stage began where the first ended
    assert temperatures and set(temperatures) == {cfg.distill_temperature}
    # the teacher saw the training images as they are, the student their JPEG-compressed copies
    data = load_data(cfg)
    tr, _ = stratified_split(data.train_y, cfg.val_fraction, cfg.seed)
    spec = get_spec(cfg.model)
    clean = normalize(torch.from_numpy(data.train_x[tr]), spec.mean, spec.std).flatten(1)
    teacher_in = torch.cat(calls["teacher"]).flatten(1)
    student_in = torch.cat(calls["student"]).flatten(1)
    assert len(teacher_in) == len(student_in) > 0
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(teacher_in, clean, compute_mode=exact).min(1).values.max() < 1e-4
    assert torch.cdist(student_in, clean, compute_mode=exact).min(1).values.min() > 1.0
    assert m["config"]["teacher"] == str(tiny_run) and m["epochs_run"] == 1


@pytest.mark.parametrize("key,value", [("seed", 1), ("val_fraction", 0.2)])
def test_teacher_that_saw_this_runs_validation_images_is_refused(tiny_run, tmp_path, key, value):
    base = json.loads((tiny_run / "metrics.json").read_text())["config"]
    cfg = TrainConfig(**{**base, "runs_dir": str(tmp_path / "runs"), "name": "x", key: value,
                         "teacher": str(tiny_run)})
    with pytest.raises(UserError, match=f"{key}=.*validation"):
        train(cfg)
    with pytest.raises(UserError, match="run folder not found"):
        train(replace(cfg, **{key: base[key]}, teacher=str(tmp_path / "nowhere")))
    corrupt = shutil.copytree(tiny_run, tmp_path / "corrupt")
    (corrupt / "metrics.json").write_text("{")
    with pytest.raises(UserError, match="corrupt .*metrics.json"):
        train(replace(cfg, **{key: base[key]}, teacher=str(corrupt)))


def test_feature_copies_cache_augmented_copies_beside_the_clean_features(tmp_path, synthetic_dir):
    plain = train(cfg_for(tmp_path, synthetic_dir, name="plain", epochs=1))
    m = train(cfg_for(tmp_path, synthetic_dir, name="copies", epochs=1, augment="jpeg", serving_aug_p=1.0,
                      feature_copies=2))
    assert m["feature_cache"] is True and m["num_train"] == plain["num_train"]
    ref = torch.load(tmp_path / "runs" / "plain" / "features.pt", weights_only=True)["features"]
    got = torch.load(tmp_path / "runs" / "copies" / "features.pt", weights_only=True)["features"]
    n = plain["num_train"]
    assert got["train"].shape[0] == 3 * n
    torch.testing.assert_close(got["train"][:n], ref["train"])  # the clean images first, then the copies
    torch.testing.assert_close(got["val"], ref["val"])  # validation and test stay clean
    for k in (1, 2):
        assert (got["train"][k * n:(k + 1) * n] - ref["train"]).abs().mean() > 1e-3  # JPEG-compressed copies
    assert not torch.equal(got["train"][n:2 * n], got["train"][2 * n:])  # each copy draws its own
    with pytest.raises(UserError, match="--feature-copies needs --augment"):
        train(cfg_for(tmp_path, synthetic_dir, name="bad", feature_copies=1, augment="none"))
