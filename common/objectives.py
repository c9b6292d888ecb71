"""Objectives: what the model is trained to predict, at which noise levels, and how a rollout steps.

Used by train_dreambooth.py (the loss, rollouts), scores.py (the stable eval loss) and evaluate.py. Two
objectives, one interface, so the training loop reads the same for every family (each family names its own:
`info.objective`):
    NoisePrediction  SD 1.x / 2.x / SDXL / IF: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on the DDPM schedule,
                     integer timesteps; the UNet predicts eps or (v-prediction) v. Min-SNR weights and noise offset
                     apply.
    FlowMatching     SD3 / FLUX.1: x_s = (1 - s) x0 + s eps for a noise level s in (0, 1) drawn by a weighting
                     scheme and shifted; the transformer predicts the velocity eps - x0.
Each draws (noise, t) for a batch from the batch's own generator, noises, gives the target and per-sample loss
weights, the noise that a given x_t implies for its clean latent (the recomputed rollout target), a k-step rollout
with the model's own predictions, and the fixed grid of the stable eval loss. How the loss is composed from them
(masks, prior preservation, DOP, weights) is train_dreambooth.py's.
"""

import math

import torch

from common import models


def for_model(info, args):
    """The objective of `info`'s family, configured by the training flags (`args`)."""
    if info.objective == "flow":
        return FlowMatching(info, getattr(args, "weighting_scheme", "logit_normal"), getattr(args, "logit_mean", 0.0),
                            getattr(args, "logit_std", 1.0), getattr(args, "mode_scale", 1.29),
                            getattr(args, "flow_shift", None))
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(info.folder, subfolder="scheduler")
    # info.training_timesteps: all of them, or a refiner's low-noise end (the img2img strength it serves)
    return NoisePrediction(scheduler, info.prediction_type, info.training_timesteps, getattr(args, "snr_gamma", None),
                           getattr(args, "noise_offset", 0.0))


class NoisePrediction:
    """Denoising on the DDPM schedule: timesteps uniform over [0, high), the noise (or v) as the target."""

    def __init__(self, scheduler, prediction_type, high, snr_gamma=None, noise_offset=0.0):
        self.scheduler, self.prediction_type, self.high = scheduler, prediction_type, high
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def describe(self):
        return (f"{self.prediction_type} prediction, timesteps 0-{self.high - 1}"
                + (f", min-SNR gamma {self.snr_gamma:g}" if self.snr_gamma else "")
                + (f", noise offset {self.noise_offset:g}" if self.noise_offset else ""))

    def draw(self, latents, generator):
        """(noise, timesteps) for a batch. --noise_offset adds a per-channel constant: the model learns to move the
        mean brightness."""
        noise = torch.randn(latents.shape, generator=generator)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        return noise, torch.randint(0, self.high, (latents.shape[0],), generator=generator)

    def add_noise(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def alphas_cumprod(self, timesteps):
        return self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()

    def target(self, latents, noise, timesteps):
        """The noise eps, or for v-prediction the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans &
        Ho 2022)."""
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def loss_weights(self, timesteps):
        """Min-SNR-γ weights (Hang et al. 2023), or None: each sample's loss as if it were an x0 loss weighted
        min(SNR, γ). With SNR = abar / (1 - abar), an ε error is sqrt(SNR) times the x0 error it implies, so the
        ε loss is SNR x the x0 loss: weight min(SNR, γ) / SNR. A v loss is (SNR + 1) x the x0 loss: weight
        min(SNR, γ) / (SNR + 1). The ε weight is computed as min(1, γ / SNR): the same number, and 1 (not 0 / 0) at
        a zero-terminal-SNR schedule's last timestep, where SNR = 0."""
        if not self.snr_gamma:
            return None
        alphas_cumprod = self.alphas_cumprod(timesteps)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        if self.prediction_type == "v_prediction":
            return torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
        return torch.clamp(self.snr_gamma / snr, max=1.0)

    def implied_noise(self, clean, noisy, timesteps):
        """The noise that puts `clean` at `noisy`: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). As a target it makes
        a rolled-out x_t imply the true clean latent (for v: v = sqrt(abar) eps - sqrt(1-abar) x0 with this eps)."""
        alphas_cumprod = self.alphas_cumprod(timesteps).view(-1, 1, 1, 1)
        return (noisy - alphas_cumprod.sqrt() * clean) / (1 - alphas_cumprod).sqrt()

    def rollout_steps(self, timestep, k):
        """How many of k steps up a rollout to `timestep` can start from (capped at the last timestep)."""
        return min(k, self.num_train_timesteps - 1 - int(timestep))

    @torch.no_grad()
    def rollout(self, predict, clean, noise, timestep, steps, sampler_name):
        """Noise the clean latent to timestep + steps, then run `steps` steps of a diffusers sampler with the
        model's own predictions (`predict(x, t)`), down to `timestep`. A fresh sampler per rollout (multistep
        samplers keep per-run state), with one inference step per training timestep: its schedule is 999, 998,
        ..., 0, so k steps from t + k end exactly at t. Returns x_t in the form the UNet is trained on (the
        variance-preserving x_t; Euler samples in its own scaled space)."""
        sampler = models.sampler(sampler_name, self.scheduler.config, timestep_spacing="trailing")
        sampler.set_timesteps(self.num_train_timesteps, device=clean.device)
        index = self.num_train_timesteps - 1 - (int(timestep) + steps)  # position of the start in 999..0
        x = sampler.add_noise(clean, noise, sampler.timesteps[index:index + 1])
        for t in sampler.timesteps[index:index + steps]:
            prediction = predict(sampler.scale_model_input(x, t), t.reshape(1))
            x = sampler.step(prediction.float(), t, x).prev_sample
        return sampler.scale_model_input(x, sampler.timesteps[index + steps])

    def eval_timesteps(self, count):
        """`count` evenly spaced timesteps of [0, high), both ends left out (t = 0 is almost noiseless, the last
        one almost pure noise: neither says much about the model)."""
        return torch.linspace(0, self.high - 1, count + 2)[1:-1].round().long()

    @staticmethod
    def label(timestep):
        return int(timestep)


class FlowMatching:
    """Rectified flow (SD3, FLUX.1): x_s = (1 - s) x0 + s eps, the velocity eps - x0 as the target.

    The noise level s: u drawn by --weighting_scheme (diffusers' compute_density_for_timestep_sampling: logit-normal
    by default, as in the SD3 paper), then shifted towards noise as the model is at inference: the scheduler's
    static shift s' = S s / (1 + (S - 1) s) (SD3: S = 3; FLUX.1-schnell: 1, none), or for a model with
    resolution-dependent shifting (FLUX.1-dev) --flow_shift auto: s' = e^mu / (e^mu + 1/s - 1) with the mu its
    pipeline computes from the image's token count, so every bucket trains on the noise levels it is drawn at.
    --flow_shift S fixes a static shift instead. Loss weights: compute_loss_weighting_for_sd3 (sigma_sqrt,
    cosmap; 1 otherwise)."""

    def __init__(self, info, weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                 flow_shift=None):
        config = info.scheduler_config
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = (weighting_scheme, logit_mean,
                                                                                   logit_std, mode_scale)
        if flow_shift is None:  # the model's own: what its scheduler does at inference
            flow_shift = "auto" if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))
        self.shift = flow_shift if flow_shift == "auto" else float(flow_shift)
        self.config = config
        self.tokens_per_latent, self.flow_mu = info.tokens_per_latent, info.flow_mu
        self.num_train_timesteps = config.get("num_train_timesteps", 1000)

    def describe(self):
        shift = ("resolution-dependent (auto)" if self.shift == "auto" else f"{self.shift:g}")
        scheme = self.weighting_scheme + (f" (mean {self.logit_mean:g}, std {self.logit_std:g})"
                                          if self.weighting_scheme == "logit_normal" else "")
        return f"flow matching (velocity), noise levels {scheme}, shift {shift}"

    def mu(self, height, width):
        """The resolution-dependent shift's mu for a latent of this size, as the family's pipeline computes it."""
        return self.flow_mu(height * width // self.tokens_per_latent)

    def shifted(self, u, shape):
        if self.shift == "auto":
            mu = math.exp(self.mu(*shape[-2:]))
            return mu / (mu + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    def draw(self, latents, generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        noise = torch.randn(latents.shape, generator=generator)
        u = compute_density_for_timestep_sampling(self.weighting_scheme, latents.shape[0], self.logit_mean,
                                                  self.logit_std, self.mode_scale, generator=generator)
        return noise, self.shifted(u.clamp(1e-5, 1 - 1e-5), latents.shape)

    @staticmethod
    def sigmas(timesteps, like):
        return timesteps.to(like.device, torch.float32).view(-1, *[1] * (like.ndim - 1))

    def add_noise(self, latents, noise, sigmas):
        s = self.sigmas(sigmas, latents)
        return (1 - s) * latents + s * noise

    def target(self, latents, noise, sigmas):
        return noise - latents

    def loss_weights(self, sigmas):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas.float())

    def implied_noise(self, clean, noisy, sigmas):
        """The noise that puts `clean` at `noisy`: (x_s - (1 - s) x0) / s; its velocity target eps - x0 then
        points from the rolled-out x_s to the true clean latent."""
        s = self.sigmas(sigmas, clean)
        return (noisy - (1 - s) * clean) / s

    def rollout_steps(self, sigma, k):
        """How many of k steps (each 1/num_train_timesteps of noise level) fit above `sigma`."""
        return min(k, int((1 - float(sigma)) * self.num_train_timesteps))

    @torch.no_grad()
    def rollout(self, predict, clean, noise, sigma, steps, sampler_name=None):
        """Noise the clean latent to s + steps/N, then `steps` Euler steps of the flow with the model's own
        velocity (`predict(x, s)`): x <- x + (s_next - s) v, down to s. Returns that x_s."""
        delta = 1.0 / self.num_train_timesteps
        levels = [float(sigma) + (steps - j) * delta for j in range(steps + 1)]
        x = self.add_noise(clean, noise, torch.tensor(levels[:1]))
        for level, next_level in zip(levels, levels[1:]):
            velocity = predict(x, torch.tensor([level], device=clean.device))
            x = x + (next_level - level) * velocity.float()
        return x

    def eval_timesteps(self, count):
        """`count` evenly spaced noise levels in (0, 1), both ends left out, unshifted (the same for every model)."""
        return torch.linspace(0, 1, count + 2)[1:-1]

    @staticmethod
    def label(sigma):
        return round(float(sigma), 4)


SAMPLER = {"noise": "unipc", "flow": "euler"}  # of a rollout (--scheduled_sampling_sampler)


def settle_flags(info, args):
    """Flags of one objective given for a model of the other are refused, never silently ignored; the rollout
    sampler left out becomes the objective's own."""
    if info.objective == "flow":
        if args.scheduled_sampling_sampler not in (None, "euler"):
            raise SystemExit(f"--scheduled_sampling_sampler {args.scheduled_sampling_sampler}: {info.ref} is "
                             f"{info.family}, trained by flow matching, whose rollouts step with Euler (the sampler "
                             "of its pipeline); leave the flag out or give euler")
        given = [flag for flag, value in (("--snr_gamma", args.snr_gamma), ("--noise_offset", args.noise_offset))
                 if value]
        if given:
            raise SystemExit(f"{' and '.join(given)} apply to noise prediction (SD 1.x/2.x/SDXL); {info.ref} is "
                             f"{info.family}, trained by flow matching: weight noise levels with --weighting_scheme "
                             "(cosmap, sigma_sqrt) and shift them with --flow_shift instead")
    elif args.weighting_scheme != "logit_normal" or args.flow_shift is not None:
        raise SystemExit(f"--weighting_scheme and --flow_shift apply to flow matching (SD3, FLUX.1); {info.ref} is "
                         f"{info.family}, trained on the DDPM schedule: use --snr_gamma for loss weighting")
    args.scheduled_sampling_sampler = args.scheduled_sampling_sampler or SAMPLER[info.objective]
