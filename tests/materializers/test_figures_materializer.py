"""A step's figures survive the artifact store whatever they are named after (an image's source is no file name)."""

import json

from PIL import Image

from materializers.figures import INDEX, FiguresMaterializer
from xray.evaluation.plots import Figures


def test_figures_named_after_sources_round_trip_under_the_artifact_folder(tmp_path):
    uri = tmp_path / "artifact"
    uri.mkdir()
    names = ["roc", "s3://incoming/batch-7/IM-0063-0001.jpeg", "../../escape", "figure-000", "a/b.png"]
    figures = Figures({name: Image.new("RGB", (4 + n, 3), (n * 40, 0, 0)) for n, name in enumerate(names)})
    materializer = FiguresMaterializer(str(uri))
    materializer.save(figures)
    written = sorted(p.relative_to(uri).as_posix() for p in uri.rglob("*") if p.is_file())
    assert all("/" not in path for path in written), written  # nothing outside the artifact's own folder
    assert len(written) == len(names) + 1 and INDEX in written
    assert "roc.png" in written
    index = json.loads((uri / INDEX).read_text())
    assert sorted(index) == sorted(names) and len(set(index.values())) == len(names)
    loaded = materializer.load(Figures)
    assert sorted(loaded.images) == sorted(names)
    for n, name in enumerate(names):
        assert loaded[name].size == (4 + n, 3) and loaded[name].getpixel((0, 0)) == (n * 40, 0, 0)
    assert sorted(materializer.save_visualizations(figures)) == sorted(str(uri / f) for f in index.values())
