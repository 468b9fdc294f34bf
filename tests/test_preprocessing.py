import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from service.backends import model_info
from service.config import ConfigError, ServiceConfig, load_config
from service.preprocessing import ImageError, Preprocessing, PreprocessingError, decode_image, fit_image
from service.runtime import ArtifactError
from utils import ModelRef


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_formats_decode_to_rgb(fmt):
    im = decode_image(encode(RGB, fmt))
    assert im.mode == "RGB" and im.size == (60, 40)


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG")])
def test_modes_decode_to_rgb(mode, fmt):
    assert decode_image(encode(RGB.convert(mode), fmt)).mode == "RGB"


def test_sixteen_bit_png_is_scaled_not_clipped():
    a = np.full((8, 8), 65535, dtype=np.uint16)
    a[:4] = 257 * 100
    out = np.asarray(decode_image(encode(Image.fromarray(a), "PNG")))
    assert out[0, 0, 0] == 100 and out[-1, -1, 0] == 255


def test_transparency_is_composited_on_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(im, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_honoured():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im = decode_image(encode(RGB, "JPEG", exif=exif))
    assert im.size == (40, 60)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(b.getvalue()))[0, 0, 0] > 200


@pytest.mark.parametrize("data,status,match", [
    (b"", 400, "empty"),
    (b"plain text", 400, "not an image"),
    (encode(RGB, "PNG")[:80], 400, "truncated"),
    (encode(RGB, "TIFF"), 415, "unsupported"),
    (encode(RGB, "BMP")[:14] + (153).to_bytes(4, "little") + encode(RGB, "BMP")[18:], 400,  # a reader's OSError
     "corrupt image header: OSError: Unsupported BMP header type"),
])
def test_bad_uploads(data, status, match):
    with pytest.raises(ImageError, match=match) as e:
        decode_image(data)
    assert e.value.status == status


def test_decompression_bomb_checked_from_header():
    bomb = encode(Image.new("L", (4000, 3000)), "PNG")  # small file, 12 MP
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="12.0 MP") as e:
        decode_image(bomb, max_megapixels=10)
    assert e.value.status == 413


def test_fit_image_centre_crops_and_resizes():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 20:60] = 255  # the centre square is white
    out = fit_image(Image.fromarray(a), 32)
    assert out.shape == (32, 32, 3) and out.min() == 255
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    expected = photo.crop((50, 0, 350, 300)).resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=2.0)
    np.testing.assert_array_equal(fit_image(photo, 32), np.asarray(expected))  # the documented recipe, exactly
    square = Image.fromarray(np.ascontiguousarray(np.asarray(photo)[:32, :32]))
    assert fit_image(square, 32).tobytes() == square.tobytes()  # the right size already: untouched


def test_preprocessing_round_trip_and_validation():
    p = Preprocessing(32, 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("a", "b"))
    assert Preprocessing.from_json(p.to_json()) == p
    x = p.to_input(np.full((2, 32, 32, 3), 255, np.uint8))
    assert x.shape == (2, 3, 32, 32) and np.allclose(x, 2.0)
    with pytest.raises(ValueError, match="shape"):
        p.to_input(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(PreprocessingError):
        Preprocessing.from_dict({"image_size": 32})
    with pytest.raises(PreprocessingError):
        Preprocessing.from_json("{")


def test_old_preprocessing_metadata_still_loads():
    old = {"image_size": 32, "input_size": 224, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b"],
           "resize": "bilinear", "layout": "NCHW"}  # written by earlier exports
    assert Preprocessing.from_dict(old) == Preprocessing(32, 224, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    assert "resize" not in Preprocessing.from_dict(old).to_dict()


def test_service_config_sources_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: [{name: a, tag: 'x:1'}, {name: b, tag: 'y:1'}]\nmodel_instances: 3\nmax_batch_size: 8\n")
    cfg = load_config({"CIFAR_DEPLOY_CONFIG": str(path)})
    assert [m.name for m in cfg.models] == ["a", "b"] and cfg.model_instances == 3 and cfg.max_batch_size == 8
    assert cfg.max_upload_mb == ServiceConfig.max_upload_mb  # not in the file: the dataclass default
    # CIFAR_DEPLOY_MODELS replaces the models only; the file's other settings stay; env fields win over the file
    cfg = load_config({"CIFAR_DEPLOY_CONFIG": str(path), "CIFAR_DEPLOY_MODELS": "c=z:1@onnxruntime-cuda",
                       "CIFAR_DEPLOY_MAX_BATCH_SIZE": "16", "CIFAR_DEPLOY_ORT_SPINNING": "true"})
    assert cfg.models == [ModelRef("c", "z:1", "onnxruntime-cuda")] and cfg.uses_gpu
    assert cfg.model_instances == 3 and cfg.max_batch_size == 16 and cfg.ort_spinning is True
    staged = tmp_path / "demo.yaml"  # one section per stage, as in configs/*.yaml
    staged.write_text("train: {epochs: 1}\nservice: {models: [{name: d, tag: 'w:1'}], workers: 2}\nloadtest: {}\n")
    cfg = load_config({"CIFAR_DEPLOY_CONFIG": str(staged)})
    assert cfg.models == [ModelRef("d", "w:1")] and cfg.workers == 2
    committed = load_config({})  # service/config.yaml
    assert committed.models and not committed.uses_gpu


@pytest.mark.parametrize("env,match", [
    ({"CIFAR_DEPLOY_MODELS": "a=x@tpu"}, "unknown backend 'tpu'"),
    ({"CIFAR_DEPLOY_MODELS": "a=x,a=y"}, "unique"),
    ({"CIFAR_DEPLOY_MODELS": "=x"}, r"models\[0\]: .*needs a name and a tag"),
    ({"CIFAR_DEPLOY_MODEL_INSTANCES": "0"}, "model_instances: must be positive"),
    ({"CIFAR_DEPLOY_MAX_BATCH_SIZE": "lots"}, "max_batch_size: 'lots' is not a valid int"),
    ({"CIFAR_DEPLOY_ACCESS_LOG": "maybe"}, "access_log: 'maybe' is not a valid bool"),
    ({"CIFAR_DEPLOY_TOPOLOGY": "split"}, "CIFAR_DEPLOY_TOPOLOGY: unknown setting"),
    ({"CIFAR_DEPLOY_MODELS": "../x=t:1"}, r"models\[0\]: name '\.\./x' is not valid"),
    ({"CIFAR_DEPLOY_MODELS": "a/b=t:1"}, "name 'a/b' is not valid"),
    ({"CIFAR_DEPLOY_MODELS": "ok=t:1,.hidden=t:1"}, r"models\[1\]: name '\.hidden' is not valid"),
    ({"CIFAR_DEPLOY_MODELS": "a=../t:1"}, r"tag '\.\./t' is not valid"),
    ({"CIFAR_DEPLOY_MODELS": "a=t/x:1"}, "tag 't/x' is not valid"),
    ({"CIFAR_DEPLOY_MODELS": "a=t:../../etc"}, r"tag version '\.\./\.\./etc' is not valid"),
    ({"CIFAR_DEPLOY_MODELS": "a=t:"}, "tag version '' is not valid"),
    ({"CIFAR_DEPLOY_MODELS": "a=" + "t" * 64 + ":1"}, "at most 63 characters"),
])
def test_service_config_refuses_bad_settings_by_name(env, match):
    with pytest.raises(ConfigError, match=match):
        load_config(env)


def test_service_config_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [{name: a, tag: x}]\nmax_batch: 3\n")
    with pytest.raises(ConfigError, match="unknown options max_batch"):
        load_config({"CIFAR_DEPLOY_CONFIG": str(bad)})
    bad.write_text("models: [{name: a, tag: x}]\nmax_upload_mb: [1]\n")
    with pytest.raises(ConfigError, match="max_upload_mb: \\[1\\] is not a valid float"):
        load_config({"CIFAR_DEPLOY_CONFIG": str(bad)})
    bad.write_text("max_batch_size: 4\n")
    with pytest.raises(ConfigError, match="models: expected a non-empty list"):
        load_config({"CIFAR_DEPLOY_CONFIG": str(bad)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"CIFAR_DEPLOY_CONFIG": str(tmp_path / "missing.yaml")})


def test_a_model_store_entry_names_a_file_of_its_own_folder_only(tmp_path):
    meta = {"file": "../../outside.onnx", "sha256": "0" * 64, "preprocessing": "{}"}
    stored = SimpleNamespace(tag="m:1", info=SimpleNamespace(metadata=meta), path_of=lambda f: str(tmp_path / f))
    with pytest.raises(ArtifactError, match="not a file name"):
        model_info(stored)
