"""The device table: every figure says where it came from."""
import re
from dataclasses import fields
from pathlib import Path

from bspfuse.devices import DEVICES, SOURCE_KINDS, Device, Figure

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_every_figure_has_a_source_of_a_known_kind():
    for dev in DEVICES.values():
        for f in fields(Device):
            if f.name == "name":
                continue
            fig = getattr(dev, f.name)
            assert isinstance(fig, Figure), (dev.name, f.name)
            kind, _, what = fig.source.partition(":")
            assert kind in SOURCE_KINDS and len(what.strip()) > 10, (dev.name, f.name, fig.source)


def test_results_files_a_source_names_are_in_the_repository():
    for dev in DEVICES.values():
        for name, fig in dev.sources().items():
            for file in re.findall(r"\b[\w-]+\.json\b", fig["source"]):
                assert (RESULTS / file).is_file(), (dev.name, name, file)


def test_measured_figures_name_where_and_when():
    for dev in DEVICES.values():
        for name, fig in dev.sources().items():
            if fig["source"].startswith("measured here"):
                assert re.search(r"\b20\d\d-\d\d-\d\d\b", fig["source"]), (dev.name, name)
                assert re.search(r"\w+_bench\.py|benchmarks/results/", fig["source"]), (dev.name, name)
