"""Official releases and our own format load, and reproduce a forward pass written independently."""

import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from depict_analysis.models import CheckpointError, create_model, load_model, save_checkpoint
from depict_analysis.models.checkpoint import read_variant
from depict_analysis.models.decoders.cbt import CBTConfig
from tests import official_layout as ref

FAMILIES = ["depict_sa", "depict_ca", "mask_transformer", "linear", "cbt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_official_release_reproduces_reference_forward(tmp_path, family):
    state = ref.write_release(tmp_path / family, family, seed=1)
    model, meta = load_model(tmp_path / family)
    assert model.config.decoder.name == family and model.n_cls == ref.K
    assert meta["inference"]["window_stride"] == 24
    # 45 x 29 is not a multiple of the patch size (8) nor the training size (32): padding and
    # position-embedding interpolation are both exercised.
    image = torch.randn(2, 3, 45, 29, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(image)
    expected = ref.segmenter_forward(image.double(), state, family)
    assert ours.shape == (2, ref.K, 45, 29)
    torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-4)


def test_distilled_backbone_uses_both_prefix_tokens(tmp_path):
    state = ref.write_release(tmp_path / "d", "depict_sa", seed=3, distilled=True)
    model, _ = load_model(tmp_path / "d" / "checkpoint.pth")
    image = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        ours = model(image)
    torch.testing.assert_close(ours.double(), ref.segmenter_forward(image.double(), state, "depict_sa"), atol=1e-4, rtol=1e-4)


def test_mode_and_head_counts_are_read_from_keys(tmp_path):
    ref.write_release(tmp_path / "ca", "depict_ca")
    model, _ = load_model(tmp_path / "ca")
    dec = model.config.decoder
    assert (dec.n_layers, dec.n_heads, dec.dim_head) == (3, ref.HEADS, 100)
    assert (dec.n_cross_layers, dec.cross_dim_head) == (3, 50)
    ref.write_release(tmp_path / "cbt", "cbt")
    model, _ = load_model(tmp_path / "cbt")
    assert model.config.decoder == CBTConfig(n_layers=3, n_heads=ref.HEADS, dim_head=100, rep_grid=10)


def test_variant_yml_is_read_safely(tmp_path):
    path = tmp_path / "variant.yml"
    path.write_text("net_kwargs:\n  image_size: !!python/tuple [512, 512]\n")
    assert read_variant(path)["net_kwargs"]["image_size"] == (512, 512)
    path.write_text("net_kwargs: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(CheckpointError, match="not a valid variant.yml"):
        read_variant(path)


def test_our_format_round_trip_is_exact(tmp_path):
    model = create_model("depict-ca-tiny", n_cls=4).eval()
    save_checkpoint(tmp_path / "m.pt", model, iteration=7)
    loaded, meta = load_model(tmp_path / "m.pt")
    assert meta["iteration"] == 7 and loaded.config == model.config
    image = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image), atol=0, rtol=0)
    assert not list(tmp_path.glob("*.tmp")), "atomic save left a temporary file behind"


def test_files_with_the_flat_decoder_config_of_before_families_still_load(tmp_path):
    model = create_model("depict-ca-tiny", n_cls=4).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["config"]["decoder"] == {"family": "depict_ca", "n_layers": 3, "n_heads": 2, "dim_head": 16,
                                        "n_cross_layers": 3, "cross_dim_head": 8}
    raw["config"]["decoder"] = {"name": "depict_ca", "n_layers": 3, "n_heads": 2, "dim_head": 16, "n_cross_layers": 3,
                                "cross_dim_head": 8, "d_model": 0, "drop_path_rate": 0.0, "dropout": 0.0}
    torch.save(raw, tmp_path / "old.pt")
    loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.config == model.config
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image), atol=0, rtol=0)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    model = create_model("linear-tiny", n_cls=3)
    save_checkpoint(tmp_path / "m.pt", model, iteration=1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "m.pt", model, iteration=2)
    monkeypatch.undo()
    assert load_model(tmp_path / "m.pt")[1]["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


class Payload:
    def __reduce__(self):
        return (print, ("this ran during unpickling",))


def bad_inputs(tmp_path):
    """(path, expected message fragment) for every kind of unreadable checkpoint."""
    ref.write_release(tmp_path / "no_variant", "depict_sa")
    (tmp_path / "no_variant" / "variant.yml").unlink()

    ref.write_release(tmp_path / "truncated", "depict_sa")
    data = (tmp_path / "truncated" / "checkpoint.pth").read_bytes()
    (tmp_path / "truncated" / "checkpoint.pth").write_bytes(data[: len(data) // 2])

    ref.write_release(tmp_path / "wrong_keys", "depict_sa")
    raw = torch.load(tmp_path / "wrong_keys" / "checkpoint.pth", weights_only=True)
    raw["model"] = {k.replace("fn.proj", "fn.weight"): v for k, v in raw["model"].items()}
    torch.save(raw, tmp_path / "wrong_keys" / "checkpoint.pth")

    with open(tmp_path / "unsafe.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    torch.save({"model": {"x": Payload()}}, tmp_path / "unsafe_zip.pt")

    return [
        (tmp_path / "no_variant" / "checkpoint.pth", "variant.yml is missing"),
        (tmp_path / "no_variant", "needs variant.yml"),
        (tmp_path / "truncated", "truncated or not a PyTorch file"),
        (tmp_path / "wrong_keys", "unrecognised decoder keys"),
        (tmp_path / "unsafe_zip.pt", "pass trust=True"),
        (tmp_path / "unsafe.pt", "checkpoint"),
        (tmp_path / "missing.pt", "no such file"),
    ]


def test_bad_checkpoints_raise_one_line_errors(tmp_path, capsys):
    for path, fragment in bad_inputs(tmp_path):
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert fragment in str(err.value) and "\n" not in str(err.value), (path, str(err.value))
    assert "this ran" not in capsys.readouterr().out


def test_depict_info_exits_2_with_one_line_on_bad_checkpoints(tmp_path):
    for path, fragment in bad_inputs(tmp_path):
        proc = subprocess.run([sys.executable, "-m", "depict_analysis.cli.main", "info", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2, (path, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        cli_fragment = fragment.replace("pass trust=True", "pass --trust-checkpoint")  # the command's own flag
        assert len(lines) == 1 and lines[0].startswith("error:") and cli_fragment in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and "this ran" not in proc.stdout


def test_trusted_loading_is_an_explicit_opt_in(tmp_path):
    model = create_model("linear-tiny", n_cls=3)
    save_checkpoint(tmp_path / "m.pt", model, note=Payload.__name__)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["extra"] = Payload()
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="pass trust=True"):
        load_model(tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt", trust=True)
    assert loaded.n_cls == 3


def test_depict_info_json_on_official_release(tmp_path):
    ref.write_release(tmp_path / "r", "depict_sa")
    proc = subprocess.run(
        [sys.executable, "-m", "depict_analysis.cli.main", "info", str(tmp_path / "r"), "--json", "--image-size", "64"],
        capture_output=True, text=True, check=True,
    )
    info = yaml.safe_load(proc.stdout)
    d, h, N = ref.D, ref.HEADS, 64
    assert info["decoder"] == "depict_sa" and info["n_cls"] == ref.K
    assert info["params_decoder"] == ref.K * d + 2 * ref.K + 3 * (2 * d + h * 100 * d + 1) + 2 * d
    # FLOPs of the matmuls, by hand: per MSSA layer on T = N + K tokens with h heads of width p:
    # project (2 T d hp) + scores (2 T T p h) + weighted sum (2 T T p h) + map back (2 T hp d); mask head 2 N K d.
    T, hp = N + ref.K, h * 100
    per_layer = 2 * T * d * hp * 2 + 2 * 2 * T * T * hp
    assert info["decoder_gflops"] == pytest.approx((3 * per_layer + 2 * N * ref.K * d) / 1e9, rel=1e-9)
