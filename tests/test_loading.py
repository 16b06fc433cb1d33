"""Loading a Hugging Face directory maps the checkpoint instead of copying it: the model's
parameters are views of the file (copy-on-write, read-only to ember), unless a dtype
conversion needs new arrays anyway."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import tiny_model_dir

from ember.io import safetensors
from ember.models import loading


def memory_map_under(array: np.ndarray) -> np.memmap | None:
    while array is not None and not isinstance(array, np.memmap):
        array = array.base
    return array


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("loading"))


def test_weights_are_views_of_the_file_not_copies(model_dir):
    model = loading.load_model(model_dir)
    saved = safetensors.load(model_dir)
    for name, value in model.state_dict().items():
        array = np.asarray(value)
        assert memory_map_under(array) is not None, name
        np.testing.assert_array_equal(array, saved[name])


def test_a_dtype_conversion_makes_new_arrays(model_dir):
    import ember.numpy as enp

    model = loading.load_model(model_dir, dtype=enp.bfloat16)
    saved = safetensors.load(model_dir)
    for name, value in model.state_dict().items():
        array = np.asarray(value)
        assert memory_map_under(array) is None and array.dtype == enp.bfloat16, name
        np.testing.assert_array_equal(array, saved[name].astype(array.dtype))
