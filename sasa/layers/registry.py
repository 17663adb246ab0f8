"""The mixer registry: the one list of what can fill the 3x3 position of a ResNet bottleneck.

A mixer registers itself where it is defined (``@register_mixer("halo", ...)``) with what the rest
of the project needs to know about it: the paper it comes from, its plot marker in the report,
the options its layer-benchmark case uses and the options that fit the small maps of the tests.
The benchmarks, the report, ``sasa.layers``' exports, the CLI and the mixer contract test all
enumerate this registry, so a new mixer is one new module (``sasa.layers`` imports every module of
the package) plus the tests of its own defining property.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

GROUPS = (1, 2, 3, 4)
IMPLS = ("fast", "reference")


def _no_options(kernel_size: int) -> dict:
    return {}


@dataclass(frozen=True)
class MixerInfo:
    """What the project knows about one registered mixer."""

    name: str
    cls: type
    paper: str
    marker: str  # matplotlib marker of its points in the report's plots
    bench_options: Callable[[int], dict] = _no_options  # its own options in the layer benchmark, given the window k
    test_options: dict = field(default_factory=dict)  # its own options on the tests' 5-9 px maps
    groups: tuple[int, ...] = GROUPS  # where its paper puts it in a ResNet (BoTNet: the last group only)

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options its constructor takes (besides channels and stride)."""
        params = inspect.signature(self.cls).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)

    @property
    def impls(self) -> tuple[str, ...]:
        """``("fast", "reference")`` for a mixer with a fast path beside its reference; empty for one
        computed by a single implementation (convolutions)."""
        return IMPLS if "impl" in self.options else ()


MIXER_INFO: dict[str, MixerInfo] = {}
MIXERS: dict[str, type] = {}  # name -> class, for building and isinstance checks


def register_mixer(name: str, *, paper: str, marker: str, bench_options=_no_options, test_options=None, groups=GROUPS):
    """Class decorator: add the mixer to the registry under ``name``."""

    def add(cls):
        if name in MIXER_INFO:
            raise ValueError(
                f"mixer {name!r} is registered twice ({MIXER_INFO[name].cls.__qualname__} and {cls.__qualname__})"
            )
        MIXER_INFO[name] = MixerInfo(name, cls, paper, marker, bench_options, dict(test_options or {}), tuple(groups))
        MIXERS[name] = cls
        return cls

    return add
