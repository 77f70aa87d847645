"""The demo world's ground-truth file (clicklens/ground_truth.py): written and read back."""

from clicklens.ground_truth import ground_truth_line, read_ground_truth, read_ground_truth_extra


def test_ground_truth_reads_back_relevant_ids_and_the_generators_extra_fields(tmp_path):
    path = tmp_path / "ground_truth.jsonl"
    path.write_text("\n".join([
        ground_truth_line("红色 圆形", ["img_2", "img_1"], category="color_shape"),
        "",
        ground_truth_line("blue", [], category="color"),
        ground_truth_line("big cross", ["img_3"]),
    ]) + "\n", encoding="utf-8")

    assert read_ground_truth(str(path)) == {"红色 圆形": {"img_1", "img_2"}, "big cross": {"img_3"}}
    assert read_ground_truth(str(path), ["big cross", "unknown"]) == {"big cross": {"img_3"}}
    assert read_ground_truth_extra(str(path), "category") == {"红色 圆形": "color_shape", "blue": "color"}


def test_a_missing_ground_truth_file_reads_as_empty(tmp_path):
    assert read_ground_truth(str(tmp_path / "none.jsonl")) == {}
    assert read_ground_truth_extra(str(tmp_path / "none.jsonl"), "category") == {}
