"""The stable eval loss: fixed timesteps, fixed noise, no side effects."""

import argparse

import pytest
import torch
from conftest import model_info, unet_inputs

from common import models, objectives, scores


def test_eval_timesteps_are_evenly_spaced_without_the_ends():
    ddpm = objectives.NoisePrediction(argparse.Namespace(config=argparse.Namespace(num_train_timesteps=1000)),
                                      "epsilon", 1000)
    assert ddpm.eval_timesteps(8).tolist() == [111, 222, 333, 444, 555, 666, 777, 888]
    assert ddpm.eval_timesteps(1).tolist() == [500]
    flow = objectives.FlowMatching.eval_timesteps(None, 4)
    assert torch.allclose(flow, torch.tensor([0.2, 0.4, 0.6, 0.8]))


@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_stable_eval_loss_is_repeatable_side_effect_free_and_the_plain_mse(tiny_model, family, prediction):
    model = tiny_model(family, prediction)
    info = model_info(model)
    unet = models.load_component(info, "unet").train()
    objective = objectives.for_model(info, argparse.Namespace())
    scheduler = objective.scheduler
    inputs = [unet_inputs(unet, family, seed=s) for s in (1, 2)]
    examples = [{"latents": i["sample"], "cond": {k: v for k, v in i.items() if k not in ("sample", "timestep")}}
                for i in inputs]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = scores.StableEvalLoss(info, objective, examples, timesteps=4, seed=5)(unet)
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert unet.training  # and the mode is given back
    assert scores.StableEvalLoss(info, objective, examples, timesteps=4, seed=5)(unet) == first
    assert scores.StableEvalLoss(info, objective, examples, timesteps=4, seed=6)(unet) != first
    assert list(first["per_timestep"]) == [200, 400, 599, 799]
    assert first["mean"] == pytest.approx(sum(first["per_timestep"].values()) / 4)

    # By hand: the second example at t = 599, its noise from the documented seed.
    t = 599
    example = examples[1]
    noise = torch.randn(example["latents"].shape[1:], generator=torch.Generator().manual_seed(5 * 1_000_003 + 1))[None]
    noisy = scheduler.add_noise(example["latents"], noise, torch.tensor([t]))
    target = scheduler.get_velocity(example["latents"], noise, torch.tensor([t])) \
        if prediction == "v_prediction" else noise
    with torch.no_grad():
        pred = unet.eval()(noisy, torch.tensor([t]), **example["cond"]).sample
    other = scores.StableEvalLoss(info, objective, examples[:1], timesteps=4, seed=5)(unet)["per_timestep"][t]
    assert first["per_timestep"][t] == pytest.approx(((pred - target) ** 2).mean().item() / 2 + other / 2, rel=1e-5)
