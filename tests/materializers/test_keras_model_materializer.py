"""A run's models: written to the artifact store, and read back from memory by the later steps of the same process
(the file once, not once per step), from the file by any other process."""

import keras
import numpy as np

from materializers import keras_model
from materializers.keras_model import FILENAME, KEPT, KerasModelMaterializer


def _model(units: int) -> keras.Model:
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(units)(inputs))


def test_a_saved_model_is_read_back_from_memory_and_another_process_reads_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_model, "_recent", type(keras_model._recent)())
    models = [_model(units) for units in range(1, KEPT + 2)]
    uris = [tmp_path / f"artifact-{n}" for n in range(len(models))]
    for uri, model in zip(uris, models, strict=True):
        uri.mkdir()
        KerasModelMaterializer(str(uri)).save(model)
        assert (uri / FILENAME).is_file()
    loaded = [KerasModelMaterializer(str(uri)).load(keras.Model) for uri in reversed(uris)][::-1]  # newest first
    # The last KEPT models come back as the objects the steps saved; an older one is read from its file.
    assert all(a is b for a, b in zip(loaded[-KEPT:], models[-KEPT:], strict=True))
    assert loaded[0] is not models[0]
    assert all(np.array_equal(a, b) for a, b in zip(loaded[0].get_weights(), models[0].get_weights(), strict=True))
    # A process that saved nothing (a step on its own machine) reads every model from its file.
    monkeypatch.setattr(keras_model, "_recent", type(keras_model._recent)())
    fresh = KerasModelMaterializer(str(uris[-1])).load(keras.Model)
    assert fresh is not models[-1]
    assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), models[-1].get_weights(), strict=True))
