"""Building mixers by name: shared settings, strict options, the input minimum they impose, and
reaching them from the CLI. (The contract every mixer keeps: test_mixer_contract.py; each mixer's
defining property: its own file; params.yaml: tests/pipeline/test_mixer_variants.py.)"""

import json

import pytest
import torch

import sasa
from sasa.__main__ import main as cli
from sasa.layers import create_mixer
from sasa.layers.mixers import mixer_options


def test_a_mixer_takes_its_constructors_keyword_options():
    assert {"block_size", "halo", "heads", "pos_enc"} <= set(mixer_options("halo"))
    assert mixer_options("conv") == ()


def test_shared_settings_reach_only_the_mixers_that_take_them():
    shared = {"kernel_size": 5, "heads": 2, "pos_enc": "relative", "impl": "fast"}
    assert create_mixer("neighborhood", 16, 16, 1, shared).kernel_size == 5
    assert create_mixer("bot", 16, 16, 1, shared).heads == 2  # bot takes heads, not kernel_size
    assert isinstance(create_mixer("conv", 16, 16, 2, shared), torch.nn.Conv2d)


def test_an_unknown_mixer_option_is_an_error_naming_it_and_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"mixer='halo' has no option 'blocksize'; it takes: block_size, halo, heads, pos_enc"
    ):
        create_mixer("halo", 16, 16, 1, blocksize=4)
    with pytest.raises(ValueError, match=r"mixer='axial' is not supported; allowed: 'conv', 'sasa'"):
        create_mixer("axial", 16, 16)


def test_a_mixer_that_needs_large_maps_raises_the_input_minimum():
    """Neighbourhood windows must fit in the map. In a small-input ResNet-26 the smallest maps the
    mixers see are at stride 4 (group 3's later blocks, group 4's only block): 4 (k - 1) + 1 px."""
    kwargs = dict(width=0.125, heads=2, small_input=True, form="full_attention", mixer="neighborhood")
    assert sasa.create_model("resnet26", kernel_size=3, **kwargs).min_input_size == 9
    model = sasa.create_model("resnet26", kernel_size=7, **kwargs)
    assert model.min_input_size == 25
    model(torch.randn(1, 3, 25, 25))
    with pytest.raises(ValueError, match="too small for this network: it needs at least 25x25"):
        model(torch.randn(1, 3, 24, 24))


def test_cli_info_counts_a_mixer(capsys):
    assert (
        cli(
            [
                "info",
                "--model",
                "resnet50",
                "--form",
                "conv_stem_attention",
                "--mixer",
                "halo",
                "--mixer-arg",
                "block_size=8",
                "--mixer-arg",
                "halo=3",
                "--json",
            ]
        )
        == 0
    )
    halo = json.loads(capsys.readouterr().out)
    assert halo["mixer"] == "halo" and halo["mixer_args"] == {"block_size": 8, "halo": 3}
    assert cli(["info", "--model", "resnet50", "--form", "conv_stem_attention", "--json"]) == 0
    sasa_counts = json.loads(capsys.readouterr().out)
    assert halo["params"] != sasa_counts["params"] and halo["flops"] != sasa_counts["flops"] > 0
    assert (
        cli(
            [
                "info",
                "--model",
                "resnet26",
                "--form",
                "conv_stem_attention",
                "--mixer",
                "halo",
                "--mixer-arg",
                "block=8",
            ]
        )
        == 2
    )
    assert "mixer='halo' has no option 'block'" in capsys.readouterr().err
