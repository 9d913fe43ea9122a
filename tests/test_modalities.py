import pytest

from generator.modalities import UnknownModalityError, resolve_modality


@pytest.mark.parametrize(
    "text, modality",
    [("CXR", "cxr"), ("chest x-ray", "cxr"), ("X-Ray", "cxr"), ("Chest_CT", "chest_ct"), ("MRI brain", "brain_mri"),
     ("colour fundus", "fundus"), ("SD-OCT", "oct"), ("optical coherence tomography", "oct")],
)
def test_aliases(text, modality):
    assert resolve_modality(text) == modality


def test_unknown_modality_lists_known_ones_and_aliases():
    with pytest.raises(UnknownModalityError) as err:
        resolve_modality("petct")
    message = str(err.value)
    assert "petct" in message and "cxr (aliases:" in message and "fundus" in message
