"""The miniature GenEval's stand-in judge: near its ceiling on real renders, near zero on noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligntok.eval.geneval_scenes import (
    create_prompts,
    miniature_geneval,
    prompt_renders,
    reconstruct,
)
from aligntok.standins.judge import JudgeConfig, SceneJudge


@pytest.fixture(scope="module")
def judge():
    """Trained once (about 20 s on one core): 800 steps on 1,500 scenes plus 300 made for other prompts.

    Tests only read it (detect is inference-only)."""
    return SceneJudge.train(JudgeConfig(steps=800, train_images=1500))


def test_judge_scores_real_renders_near_its_ceiling_and_noise_near_zero(judge):
    prompts = create_prompts(seed=43, n=10)  # not the prompts of the training scenes
    real = miniature_geneval(judge.detect, prompt_renders(prompts, seed=0, resolution=64), prompts)
    assert real["overall"] > 0.75, real["tasks"]
    assert real["tasks"]["single_object"]["score"] == 1.0 and real["tasks"]["colors"]["score"] >= 0.9
    noise = np.random.default_rng(0).integers(0, 256, (len(prompts), 64, 64, 3), dtype=np.uint8)
    assert miniature_geneval(judge.detect, noise, prompts)["overall"] < 0.1
    gray = np.full((len(prompts), 64, 64, 3), 128, np.uint8)
    assert miniature_geneval(judge.detect, gray, prompts)["overall"] < 0.1


def test_a_tokenizers_ceiling_judges_its_reconstructions(judge):
    class Identity(torch.nn.Module):  # a perfect tokenizer reaches the judge's ceiling
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def encode(self, x):
            return x

        def decode(self, z):
            return z * self.scale

    prompts = create_prompts(seed=43, n=4)
    images = prompt_renders(prompts, seed=0, resolution=64, samples_per_prompt=2)
    np.testing.assert_array_equal(reconstruct(Identity(), images), images)
    blank = Identity()
    blank.scale.data.zero_()  # decodes everything to mid-gray
    assert miniature_geneval(judge.detect, reconstruct(blank, images), prompts)["overall"] < 0.1
    ceiling = miniature_geneval(judge.detect, images, prompts)
    assert ceiling["num_images"] == 2 * len(prompts) and ceiling["num_prompts"] == len(prompts)


def test_save_and_load_give_the_same_detections(judge, tmp_path):
    images = prompt_renders(create_prompts(seed=43, n=2)[:3], seed=0, resolution=64)
    loaded = SceneJudge.load(judge.save(tmp_path / "judge"))
    assert loaded.detect(images) == judge.detect(images)
    with pytest.raises(FileNotFoundError, match="no scene judge"):
        SceneJudge.load(tmp_path)
