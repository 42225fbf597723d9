"""The runs layer (``depict_analysis.compare``): several models × one image source × one analysis, each model
on its own; an analysis refuses to pool traces of two models."""

import numpy as np
import pytest
import torch

from depict_analysis import (
    DepictError,
    ImageSource,
    Trace,
    analyze_coding_rates,
    analyze_orthogonality,
    analyze_pca,
    compare,
    load_model,
    trace,
)
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.models import create_model
from depict_analysis.models.data import class_info
from depict_analysis.models.sources import CheckpointInfo, LoadedModel
from depict_analysis.tracing import trace_batches

SYNTHETIC = ImageSource(dataset="synthetic", num_images=3, batch_size=2)


def tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("depict-sa-tiny", n_cls=4).eval()


def test_an_analysis_refuses_to_pool_traces_of_two_models():
    images = torch.randn(2, 3, 32, 32)
    a, b = trace(tiny(0), images), trace(tiny(1), images)  # one variant, two sets of weights
    for analysis in (analyze_coding_rates, analyze_pca, analyze_orthogonality):
        with pytest.raises(DepictError, match=f"two models.*weights {a.weights[:8]}.*weights {b.weights[:8]}"):
            analysis([a, b])
    with pytest.raises(InputError, match="different models cannot be concatenated"):
        Trace.cat([a, b])
    named = [trace(tiny(0), images, source="baseline"), trace(tiny(1), images, source="retrained")]
    with pytest.raises(InputError, match="baseline and retrained"):
        analyze_coding_rates(named)


def test_traces_of_one_model_pool_into_the_result_of_all_its_images():
    model, images = tiny(0), torch.randn(3, 3, 32, 32)
    pooled = analyze_coding_rates([trace(model, images[:2]), trace(model, images[2:])])
    whole = analyze_coding_rates(trace(model, images))
    np.testing.assert_allclose(pooled.token_rate.per_image, whole.token_rate.per_image, rtol=1e-6)


def test_compare_gives_each_model_its_own_result_on_the_same_images(tmp_path):
    sa = load_model("builtin:depict-sa")
    stranger = LoadedModel(tiny(3), CheckpointInfo("stranger", "python", "python", 4))
    result = compare([sa, "seg=builtin:segmenter", stranger], SYNTHETIC, analyze_orthogonality, baseline_seeds=(),
                     out=tmp_path / "out", save_trace=tmp_path / "t.trace", progress=False)
    assert result.labels == ["DEPICT-SA", "seg", "stranger"]
    assert result.sources == ["builtin:depict-sa", "builtin:segmenter", "python"]
    assert [r.settings["num_images"] for r in result.results] == [3, 3, 3]
    assert result.results[0].class_names == class_info("synthetic")[0]  # the model's own classes
    assert result.results[2].class_names == [f"class {i}" for i in range(4)]
    assert result.trace_files == [tmp_path / f"t_{label}.trace" for label in result.labels]
    assert (tmp_path / "out" / "orthogonality.json").is_file() and result.files
    # each saved trace holds its model's traces of the same images: analysed again, the same numbers
    again = compare(traces=[f"again={tmp_path / 't_seg.trace'}"], analysis=analyze_orthogonality, baseline_seeds=())
    assert again.labels == ["again"] and again.settings == {"traces": [str(tmp_path / "t_seg.trace")]}
    assert again.results[0].images == result.results[1].images
    direct = analyze_orthogonality(trace_batches(sa.model, SYNTHETIC.batches(sa.model)[1], progress=False), baseline_seeds=())
    assert result.results[0].summary() == direct.summary()


def test_compare_takes_models_or_saved_traces_not_both(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        compare(["builtin:depict-sa"], traces=[tmp_path / "t.trace"], analysis=analyze_coding_rates)
    with pytest.raises(ConfigError, match="needs images"):
        compare(["builtin:depict-sa"], analysis=analyze_coding_rates)


def test_an_image_source_names_its_images_or_its_dataset(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        ImageSource()
    with pytest.raises(ConfigError, match="not both"):
        ImageSource(images=[tmp_path], dataset="synthetic")
    with pytest.raises(ConfigError, match="label files go with image files"):
        ImageSource(dataset="synthetic", labels=[tmp_path])
    with pytest.raises(ConfigError, match="view must be one of crop, whole"):
        ImageSource(dataset="synthetic", view="test")
    assert SYNTHETIC.describe() == {"dataset": "synthetic", "split": "val", "num_images": 3}
    model = tiny(0)
    total, batches = ImageSource(dataset="synthetic", num_images=3, batch_size=2, size=24).batches(model)
    assert total == 3 and [b.pixels.shape for b in batches] == [(2, 3, 24, 24), (1, 3, 24, 24)]
