"""The toy world's judge: a small CNN that reads shape, colour, background, size and place off a picture.

    python toy/toy_scorer.py --output toy/scorer.safetensors          # train it (about two minutes on 2 cores)

It scores what a toy model draws (does "a small red circle at the top on a blue background" come out as one?),
and its penultimate layer (128 features) is the feature space for subject fidelity, as DINO is for photos.
Trained on fresh procedural pictures (toy/make_toy_data.py), it is checked on pictures of another seed.
"""

import argparse
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import make_toy_data  # noqa: E402

HEADS = {"shape": make_toy_data.SHAPES, "colour": sorted(make_toy_data.COLOURS),
         "background": sorted(make_toy_data.COLOURS), "size": sorted(make_toy_data.SIZES),
         "place": sorted(make_toy_data.PLACES)}
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scorer.safetensors")


class ToyScorer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128, 128):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [torch.nn.Conv2d(channels, width, 3, stride=2, padding=1), torch.nn.GroupNorm(8, width),
                       torch.nn.SiLU()]
            channels = width
        self.body = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(128, len(values)) for name, values in HEADS.items()})

    def features(self, pixels):
        """The 128 penultimate features of pixels in [-1, 1], (B, 3, 64, 64)."""
        return self.body(pixels).mean(dim=(2, 3))

    def forward(self, pixels):
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def to_pixels(images):
    """PIL images -> (B, 3, 64, 64) in [-1, 1] (resized to 64 px when needed)."""
    arrays = [np.asarray(image.convert("RGB").resize((make_toy_data.SIZE,) * 2)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def labels_of(attributes):
    return {name: torch.tensor([values.index(a[name]) for a in attributes]) for name, values in HEADS.items()}


def load_scorer(path=DEFAULT_PATH):
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no toy scorer there; train one with python toy/toy_scorer.py --output {path}")
    scorer = ToyScorer()
    scorer.load_state_dict(load_file(path))
    return scorer.eval()


@torch.no_grad()
def predict(scorer, images):
    """[{head: value}] for PIL images."""
    logits = scorer(to_pixels(images))
    picks = {name: logits[name].argmax(1).tolist() for name in HEADS}
    return [{name: HEADS[name][picks[name][i]] for name in HEADS} for i in range(len(images))]


_CENTRES = {}


def world_centre(scorer, count=256, seed=777):
    """The mean feature of ordinary toy pictures: subtracted before cosines, so that what every picture shares
    (the pooled features are mostly positive) does not make everything look alike."""
    if id(scorer) not in _CENTRES:
        images = [make_toy_data.toy_sample(i, seed)[0] for i in range(count)]
        with torch.no_grad():
            _CENTRES[id(scorer)] = scorer.features(to_pixels(images)).mean(0)
    return _CENTRES[id(scorer)]


@torch.no_grad()
def embed(scorer, images):
    """Centred, L2-normalised penultimate features of PIL images: the toy world's DINO embedding."""
    return torch.nn.functional.normalize(scorer.features(to_pixels(images)) - world_centre(scorer), dim=-1)


def subject_fidelity(scorer, generated, real):
    """Mean cosine between every generated image and every real subject image (the DINO score's recipe)."""
    return (embed(scorer, generated) @ embed(scorer, real).T).mean().item()


def paired_similarity(scorer, images, others):
    """Mean cosine of image i with others[i] (same prompt and seed, two models): 1 = unchanged."""
    return (embed(scorer, images) * embed(scorer, others)).sum(-1).mean().item()


def prompt_fidelity(scorer, images, requested):
    """Share of asked-for attributes read right: `requested` holds, per image, {head: value} for what its prompt
    names (a background colour, a size, a place)."""
    read = predict(scorer, images)
    checks = [r[name] == value for r, asked in zip(read, requested) for name, value in asked.items()]
    return sum(checks) / max(1, len(checks))


def accuracy(scorer, count=500, seed=12345):
    """Share of fresh procedural pictures (another seed than training's) read right, per head."""
    samples = [make_toy_data.toy_sample(i, seed) for i in range(count)]
    predicted = predict(scorer, [image for image, _, _ in samples])
    return {name: float(np.mean([p[name] == s[2][name] for p, s in zip(predicted, samples)])) for name in HEADS}


def train(steps=1500, batch_size=64, pool=12000, seed=0, learning_rate=2e-3):
    torch.manual_seed(seed)
    samples = [make_toy_data.toy_sample(i, seed) for i in tqdm(range(pool), desc="drawing pictures", unit="img")]
    pixels = to_pixels([image for image, _, _ in samples])
    labels = labels_of([attributes for _, _, attributes in samples])
    scorer = ToyScorer()
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="training the scorer", unit="step"):
        index = torch.randint(0, pool, (batch_size,), generator=generator)
        batch = pixels[index] + 0.05 * torch.randn(pixels[index].shape, generator=generator)  # a little noise
        logits = scorer(batch)
        loss = sum(torch.nn.functional.cross_entropy(logits[n], labels[n][index]) for n in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return scorer.eval()


def main(argv=None):
    from common import files

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=DEFAULT_PATH)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scorer = train(args.steps, seed=args.seed)
    scores = accuracy(scorer)
    print("accuracy on 500 fresh pictures: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    files.save_safetensors_atomic(scorer.state_dict(), args.output)
    print(f"saved {args.output}")
    return scores


if __name__ == "__main__":
    main()
