"""The registries are the one list: what enumerates mixers or models reads them, so a mixer
registered anywhere reaches the layer exports, the benchmark, the CLI and the ResNets."""

import pytest
import torch.nn as nn

import sasa.layers
from benchmarks import layer as layer_benchmark
from sasa.__main__ import main as cli
from sasa.layers import MIXER_INFO, MIXERS, create_mixer
from sasa.layers.registry import register_mixer
from sasa.models import create_model, is_resnet, list_models, model_family
from sasa.models.registry import check_model


@pytest.fixture
def toy_mixer():
    """A mixer registered by a test, as a new module would register it; removed afterwards."""

    @register_mixer("toy", paper="a test", marker="x", test_options={"scale": 2.0})
    class Toy(nn.Conv2d):
        def __init__(self, in_channels, out_channels, stride=1, *, kernel_size=3, scale=1.0, impl="fast"):
            super().__init__(in_channels, out_channels, kernel_size, stride, kernel_size // 2)
            self.scale, self.impl = scale, impl

    yield Toy
    del MIXER_INFO["toy"], MIXERS["toy"]


def test_every_registered_mixer_is_exported_benchmarked_and_offered_by_the_cli(capsys):
    assert {"conv", "sasa", "halo", "bot", "aa", "elsa"} <= set(MIXER_INFO)
    cases = set(layer_benchmark.LAYERS)
    with pytest.raises(SystemExit):
        cli(["info", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, info in MIXER_INFO.items():
        assert getattr(sasa.layers, info.cls.__name__) is info.cls and info.cls.__name__ in sasa.layers.__all__
        if name != "conv":
            wanted = {f"{name}_{impl}" for impl in info.impls} or {name}
            assert wanted <= cases, name
        assert name in help_text


def test_a_new_mixer_reaches_the_builders_and_the_benchmark_through_the_registry(toy_mixer):
    assert MIXERS["toy"] is toy_mixer and MIXER_INFO["toy"].impls == ("fast", "reference")
    assert {
        "toy_fast": ("toy", "fast"),
        "toy_reference": ("toy", "reference"),
    }.items() <= layer_benchmark._mixer_cases().items()
    layer = create_mixer("toy", 4, 4, 2, {"kernel_size": 5, "heads": 2, "impl": "reference"}, scale=3.0)
    assert (layer.kernel_size, layer.stride, layer.scale, layer.impl) == ((5, 5), (2, 2), 3.0, "reference")
    model = create_model("resnet26", width=0.125, small_input=True, form="conv_stem_attention", mixer="toy")
    assert type(model.layer3[0].mixer) is toy_mixer
    with pytest.raises(ValueError, match="mixer='toy' has no option 'scal'; it takes: kernel_size, scale, impl"):
        create_mixer("toy", 4, 4, scal=1)


def test_a_name_is_registered_once(toy_mixer):
    with pytest.raises(ValueError, match="mixer 'toy' is registered twice"):
        register_mixer("toy", paper="again", marker="o")(nn.Identity)


def test_models_register_with_their_family():
    assert list_models(family="ResNet") == ["resnet26", "resnet38", "resnet50"]
    assert list_models(family="RetinaNet") == ["retinanet_resnet26", "retinanet_resnet38", "retinanet_resnet50"]
    families = ("ResNet", "RetinaNet")
    assert set(list_models()) == {"cvt13", "cvt21", *(name for f in families for name in list_models(family=f))}
    assert [model_family(n) for n in ("resnet50", "cvt13", "timm:vit_tiny_patch16_224")] == ["ResNet", "CvT", "ViT"]
    assert is_resnet("resnet38") and not is_resnet("cvt13") and not is_resnet("timm:resnet50")
    with pytest.raises(ValueError, match="model='resnet51' is not supported"):
        model_family("resnet51")
    assert list_models(task="detection") == list_models(family="RetinaNet")
    check_model("timm:vit_tiny_patch16_224", task="classification")
    with pytest.raises(ValueError, match=r"allowed: 'cvt13', 'cvt21', 'resnet26', 'resnet38', 'resnet50', 'timm:NAME"):
        check_model("retinanet_resnet50", task="classification")
    with pytest.raises(ValueError, match=r"model='timm:vit_tiny_patch16_224' is not supported; allowed: 'retinanet_"):
        check_model("timm:vit_tiny_patch16_224", task="detection")
