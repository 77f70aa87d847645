"""The pipeline writes the same outputs as before issue 14's throughput work, for the same inputs and config.

The digests below are of the canonical content (tests/pipeline_digest.py: records
sorted, the work dir's path replaced) that the pipeline wrote for the small demo
world (tests/conftest.py's SMALL_WORLD) before its stages were restructured
(one combiner per query for click statistics and categories, the vocabulary
from those, a set-union combiner for logged images, examples serialized without
TensorFlow).  A change that is meant to change the outputs must update them:
report.json's changed when the report gained `log_files` and `session_click_cap`
(pipeline.skip_corrupt_files, pipeline.max_clicks_per_session*), all 0 here:
every other output stayed byte-identical, and so did the report's other figures.
train and eval changed once more when the content graph's similarities became
float64 products rounded to float32 (beam_pipelines/lsh.py:similarities): a
float32 matmul's last bits depend on the BLAS kernel the CPU picks, so these
digests held on AVX2 machines and failed on AVX-512 ones.  Now they are the same
on both (tests/test_content_graph.py checks the kernels).

    python -m tests.pipeline_digest W/examples
"""

import os

from tests.conftest import run_verb
from tests.pipeline_digest import output_digests

SMALL_WORLD_DIGESTS = {
    "train": "d8435987a638dbbebf550afd5e263600d6257139e53673d88632556b8a33862a",
    "eval": "d2fbfbc503691bc0f6b28e1e68eabf0d00dddc439cb8d4321ff88777d71cb308",
    "corpus": "352888f9c52a66c8f2936aac74fea9f842a0171295b3a35d38a5f3b03d7a5d35",
    "dead_letter": "e22f291f84c0a7a8a487e77c6c3429f53467bae265ac63d136a7ff2f6eb6bea3",
    "logged_images": "1da980f7ddd99991ae627e67431bee20a1b302728ea8c7b872d8c33bf0bdf803",
    "vocab.txt": "089e41a8e6e9c731cea6caa20d923777e863e6d03886aec66817fb020e623b62",
    "report.json": "b2f9eaa6cb97ab3d3900f5b1003f3d8cf1d21ddcf8e7634170a78755c21f494a",
}
# The same world with two hard negatives per example (the negatives' joins and report figures).
HARD_NEGATIVES_DIGESTS = {
    **SMALL_WORLD_DIGESTS,
    "train": "c419afc6eab5d1822376d8182559bf6dcce6bf47f6eb9d6965528b8f31696145",
    "eval": "fdb126ac02beafd7ec5e82eedfbf08d6f66769b984c5dc218d786f1bd00e1d69",
    "report.json": "6389f1f83a7eda687355beea6d4fdf3602fd560db31cd26016bc0e017a03413f",
}


def test_small_world_outputs_equal_the_golden_digests(demo_examples):
    assert output_digests(demo_examples.examples) == SMALL_WORLD_DIGESTS


def test_small_world_with_hard_negatives_equal_the_golden_digests(demo_world, tmp_path):
    # ~20 s: a second pipeline run over the same raw inputs (linked, so dead letters name paths under tmp_path).
    os.symlink(demo_world.raw, tmp_path / "raw")
    run_verb("pipeline", tmp_path, overrides=["pipeline.hard_negatives=2"])
    assert output_digests(str(tmp_path / "examples")) == HARD_NEGATIVES_DIGESTS
