"""A model's caption wording (generator.data.wording): learned from its training rows' structured findings, and the
graph's composition writing prompts in it."""

from generator.data import ManifestRow
from generator.data.wording import caption, learn_wording, read_wording, write_wording


def rows() -> list[ManifestRow]:
    def row(text, findings, modality="fundus"):
        return ManifestRow("x.png", text, modality, findings, "ds:train")

    dme, dr = "diabetic_macular_edema", "diabetic_retinopathy"
    return [
        row("Colour fundus photograph, left eye. Findings: diabetic macular oedema; proliferative diabetic retinopathy.",
            [{"name": dme, "present": True, "side": "left"}, {"name": dr, "present": True, "severity": "proliferative", "side": "left"}]),
        row("Colour fundus photograph, right eye. Findings: no diabetic macular oedema; non-proliferative diabetic retinopathy.",
            [{"name": dme, "present": False, "side": "right"}, {"name": dr, "present": True, "severity": "non_proliferative", "side": "right"}]),
        row("Colour fundus photograph, right eye. Findings: no diabetic macular oedema; non-proliferative diabetic retinopathy.",
            [{"name": dme, "present": False, "side": "right"}, {"name": dr, "present": True, "severity": "non_proliferative", "side": "right"}]),
        row("Colour fundus photograph, right eye. Findings: no diabetic macular oedema; no diabetic retinopathy.",
            [{"name": dme, "present": False}, {"name": dr, "present": False}]),
        row("Axial chest CT slice. No pulmonary nodule or mass.", [{"name": "lung_cancer", "present": False}], "chest_ct"),
        row("Axial chest CT slice. Findings: malignant lung lesion (lung cancer).", [{"name": "lung_cancer", "present": True}], "chest_ct"),
        row("A caption without a findings part", [{"name": "lung_cancer", "present": True}], "chest_ct"),
    ]


def test_wording_is_learned_from_the_structured_findings(tmp_path):
    w = learn_wording(rows())
    fundus = w["fundus"]
    assert fundus["present"]["diabetic_retinopathy"] == "non-proliferative diabetic retinopathy"  # the most frequent
    assert fundus["present"]["diabetic_retinopathy|proliferative"] == "proliferative diabetic retinopathy"
    assert fundus["absent"] == {"diabetic_macular_edema": "no diabetic macular oedema", "diabetic_retinopathy": "no diabetic retinopathy"}
    assert fundus["normal"] == "no diabetic macular oedema; no diabetic retinopathy"
    assert fundus["technique"]["diabetic_macular_edema|left"] == "Colour fundus photograph, left eye."
    assert w["chest_ct"]["absent"] == {"lung_cancer": "No pulmonary nodule or mass"}  # a caption without "Findings:"
    write_wording(w, tmp_path / "wording.json")
    assert read_wording(tmp_path) == w and read_wording(tmp_path / "absent") is None


def test_captions_and_the_graphs_composition_in_the_learned_words():
    from agents.prompts import compose_prompt

    w = learn_wording(rows())
    dme = {"name": "diabetic_macular_edema", "laterality": "left"}
    dr = {"name": "diabetic_retinopathy", "present": False}
    assert caption(w, "fundus", [dme], [dr]) == ("Colour fundus photograph, left eye. Findings: diabetic macular oedema; "
                                                 "no diabetic retinopathy.")
    assert caption(w, "fundus", [], []) == "Colour fundus photograph, right eye. Findings: no diabetic macular oedema; no diabetic retinopathy."
    assert caption(w, "fundus", [{"name": "drusen"}], []) is None and caption(w, "oct", [], []) is None  # no words: not composed
    composed = compose_prompt({"text": "DME, left eye, no DR."}, {"findings": [{**dme, "present": True}, dr]}, "fundus", wording=w)
    assert composed["prompt"] == caption(w, "fundus", [dme], [dr]) and composed["negative"] == "non-proliferative diabetic retinopathy."
    assert composed["report"]["findings"]  # the structured report stays for the reader
    phantom = compose_prompt({"text": "Drusen."}, {"findings": [{"name": "drusen", "present": True}]}, "fundus", wording=w)
    assert phantom["prompt"] == compose_prompt({"text": "Drusen."}, {"findings": [{"name": "drusen", "present": True}]}, "fundus")["prompt"]
