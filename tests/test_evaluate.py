"""evaluate.py and the scores: CLIP-T / CLIP-I / DINO, the shared eval loss, metrics and the report."""

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import FLOW, model_info, resolution_for, train_argv
from PIL import Image

from common import adapters, images, models, render, scores
import evaluate
import make_demo
import train_dreambooth


def test_dreambench_prompts_and_the_clip_t_text_side():
    objects, live = scores.dreambench_prompts("object"), scores.dreambench_prompts("live")
    assert len(objects) == len(live) == 25 and len(set(objects)) == 25
    assert "a {instance} wearing a santa hat" in live and "a {instance} floating in an ocean of milk" in objects
    assert objects[:10] == live[:10] and objects[-5:] == live[-5:] == [
        "a red {instance}", "a purple {instance}", "a shiny {instance}", "a wet {instance}",
        "a cube shaped {instance}"]
    assert scores.fill_prompt("a {instance} in the jungle", "ohwx dog", "dog") == ("a ohwx dog in the jungle",
                                                                               "a dog in the jungle")
    assert scores.fill_prompt("a photo of ohwx dog", "ohwx dog", "dog") == ("a photo of ohwx dog", "a photo of dog")
    assert scores.fill_prompt("a {class} next to a {instance}", "ohwx dog", "dog") == (
        "a dog next to a ohwx dog", "a dog next to a dog")


def pictures(count, seed):
    return [make_demo.draw_subject(48, 40, seed=seed + i) for i in range(count)]


def test_scores_agree_with_a_direct_computation(tiny_scorers):
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessorPil, ViTModel

    clip_folder, dino_folder = tiny_scorers
    scorer = scores.Scorer(clip_folder, dino_folder)
    generated, real = pictures(3, 0), pictures(2, 10)
    texts = ["a toy", "a red toy on a table", "a toy in the snow"]
    result = scorer.scores(generated, texts, scorer.clip_images(real), scorer.dino_images(real))

    # Directly: CLIPModel's own forward pass normalises image_embeds and text_embeds.
    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        out = model(**processor(text=texts, images=generated, padding=True, return_tensors="pt"))
        real_out = model(**processor(text=texts[:1], images=real, padding=True, return_tensors="pt"))
    clip_t = torch.stack([out.image_embeds[i] @ out.text_embeds[i] for i in range(3)]).mean()
    clip_i = torch.stack([a @ b for a in out.image_embeds for b in real_out.image_embeds]).mean()
    vit, vit_processor = ViTModel.from_pretrained(dino_folder).eval(), ViTImageProcessorPil.from_pretrained(dino_folder)
    with torch.no_grad():
        def cls(batch):
            token = vit(**vit_processor(images=batch, return_tensors="pt")).last_hidden_state[:, 0]
            return token / token.norm(dim=-1, keepdim=True)
        dino = (cls(generated) @ cls(real).T).mean()
    assert result["clip_t"] == pytest.approx(clip_t.item(), abs=1e-5)
    assert result["clip_i"] == pytest.approx(clip_i.item(), abs=1e-5)
    assert result["dino"] == pytest.approx(dino.item(), abs=1e-5)
    assert len({round(v, 3) for v in result.values()}) == 3

    same = scorer.scores(generated[:1], texts[:1], scorer.clip_images(generated[:1]), scorer.dino_images(generated[:1]))
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)


def eval_argv(model, subject_dir, checkpoints, *extra):
    """The training run's data and pictures at its resolution (resolution_for: 64 px, IF 32; FLUX's native size is
    1024 px, whatever the model's width)."""
    side = str(resolution_for(model))
    return ["--pretrained_model_name_or_path", model, "--checkpoints", str(checkpoints), "--instance_data_dir",
            subject_dir, "--instance_prompt", "ohwx toy", "--class_prompt", "toy", "--resolution", side, "--seed", "7",
            "--eval_split", "2", "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--image_resolution",
            side, *map(str, extra)]


def log_records(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "logs", "train_log.jsonl"))]


@pytest.mark.parametrize("family,model_type", [("sd1", "lora"), ("sd1", "full"), ("flux", "lora+text"),
                                               ("sd3", "full"), ("chroma", "lora"), ("flux2-klein", "lora"),
                                               ("if", "lora")])
def test_eval_loss_in_training_equals_evaluate_on_the_same_checkpoint(tiny_model, subject_dir, tmp_path, family,
                                                                      model_type):
    model = tiny_model(family)
    out = tmp_path / "out"
    text = ["--train_text_encoder"] if model_type == "lora+text" else []  # captions read by the trained encoders
    train_dreambooth.main(train_argv(model, subject_dir, out, "--model_type", model_type.split("+")[0],
                                     "--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_split", "2",
                                     "--eval_steps_interval", "2", "--use_ema", "--ema_decay", "0.5", *text,
                                     prompt="ohwx toy"))
    logged = {r["step"]: r for r in log_records(out) if "eval_loss" in r}
    assert sorted(logged) == [0, 2, 4]
    for weights, key in (("raw", "eval_loss"), ("ema", "eval_loss/ema")):
        results = evaluate.main(eval_argv(model, subject_dir, out, "--clip_model", "none", "--weights", weights,
                                          "--evaluation_dir", tmp_path / weights, "--num_images_per_prompt", "1"))
        assert [(r["name"], r["step"]) for r in results] == [("base", 0), ("checkpoint-2", 2), ("final", 4)]
        for r in results:
            assert r["eval_loss"] == logged[r["step"]][key if r["step"] else "eval_loss"], (weights, r["name"])
            key_type = float if family.startswith(FLOW) else int  # flow noise levels, or DDPM timesteps
            assert r["eval_loss_per_timestep"] == {key_type(t): v for t, v in
                                                   logged[r["step"]]["eval_loss_per_timestep"].items()} or weights == "ema"
    assert logged[4]["eval_loss"] != logged[0]["eval_loss"] != logged[4]["eval_loss/ema"]


@pytest.fixture(scope="module")
def evaluated(tiny_model, tiny_scorers, tmp_path_factory):
    """One short training run (LoRA, checkpoint at step 2) evaluated with the DreamBench object prompts."""
    tmp_path = tmp_path_factory.mktemp("evaluated")
    subject = make_demo.make_subject_images(str(tmp_path / "subject"))
    model = tiny_model("sd1")
    train_dreambooth.main(train_argv(model, subject, tmp_path / "out", "--max_train_steps", "4",
                                     "--checkpointing_steps", "2", "--learning_rate", "1e-2", prompt="ohwx toy"))
    clip, dino = tiny_scorers
    results = evaluate.main(eval_argv(model, subject, tmp_path / "out", "--prompt_set", "dreambench", "--clip_model",
                                      clip, "--dino_model", dino))
    return tmp_path, model, results


def test_evaluate_writes_metrics_grids_and_plots(evaluated):
    tmp_path, model, results = evaluated
    folder = tmp_path / "out" / "evaluation"
    saved = json.load(open(folder / "metrics.json"))
    assert [r["name"] for r in saved["results"]] == ["base", "checkpoint-2", "final"]
    assert len(saved["prompts"]) == 25 and saved["prompts"][0] == "a ohwx toy in the jungle"
    for r in saved["results"]:
        assert all(-1 <= r[m] <= 1 for m in ("clip_t", "clip_i", "dino")) and r["eval_loss"] > 0
        assert list(r["eval_loss_per_timestep"]) == ["111", "222", "333", "444", "555", "666", "777", "888"]
        grid = Image.open(folder / r["grid_path"])  # seeds x prompts, the 64 px pictures drawn at 128 px, labelled
        assert grid.size == (images.ROW_LABEL_WIDTH + 2 * 128, 14 + 25 * 128)
        for p, seed in ((0, 0), (24, 1)):  # each cell the picture enlarged 2x, nearest-neighbour: its pixels intact
            saved = Image.open(folder / "images" / r["name"] / f"p{p:02d}-seed{seed}.png")
            left, top = images.ROW_LABEL_WIDTH + seed * 128, 14 + p * 128
            cell = grid.crop((left, top, left + 128, top + 128))
            assert cell.tobytes() == saved.resize((128, 128), Image.NEAREST).tobytes()
        labels = np.asarray(grid.convert("L"))[:14]
        for seed in (0, 1):  # "seed 0", "seed 1": dark text over each column, white over the prompts
            assert labels[:, images.ROW_LABEL_WIDTH + seed * 128:][:, :128].min() < 128
        assert labels[:, :images.ROW_LABEL_WIDTH].min() == 255
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    assert [row["name"] for row in rows] == ["base", "checkpoint-2", "final"]
    assert float(rows[2]["clip_i"]) == pytest.approx(results[2]["clip_i"], abs=1e-6)
    for plot in ("scores.png", "eval_loss_by_timestep.png"):
        assert Image.open(folder / "plots" / plot).size[0] > 300
    # The same seeds for every model: the base images are the base pipeline's own, the trained ones differ.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    direct = pipe("a ohwx toy in the snow", height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(1)).images[0]
    base = Image.open(folder / "images" / "base" / "p01-seed1.png")
    assert base.tobytes() == direct.tobytes()
    assert Image.open(folder / "images" / "final" / "p01-seed1.png").tobytes() != base.tobytes()


class Node:
    """An element of a parsed page: tag, attributes, children (Nodes and strings)."""

    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    def all(self, tag, **attrs):
        """Every element below this one with `tag` and these attribute values ("class_" for class), in page order."""
        wanted = {k.rstrip("_"): v for k, v in attrs.items()}
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and all(child.attrs.get(k) == v for k, v in wanted.items()):
                    found.append(child)
                found += child.all(tag, **attrs)
        return found

    def one(self, tag, **attrs):
        [node] = self.all(tag, **attrs)
        return node

    @property
    def text(self):
        return "".join(c if isinstance(c, str) else c.text for c in self.children).strip()


def parse_page(path):
    """report.html as a tree of Nodes (the standard library's tokenizer; void elements such as <img> have no end)."""
    class Builder(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack = [Node("document", {})]

        def handle_starttag(self, tag, attrs):
            node = Node(tag, attrs)
            self.stack[-1].children.append(node)
            if tag not in ("img", "meta", "br", "hr", "link", "input"):
                self.stack.append(node)

        def handle_endtag(self, tag):
            while self.stack[-1].tag != tag:  # an element left open closes with its parent
                self.stack.pop()
            self.stack.pop()

        def handle_data(self, data):
            self.stack[-1].children.append(data)

    builder = Builder()
    builder.feed(open(path, encoding="utf-8").read())
    return builder.stack[0]


def image_rows(table):
    """An image table's column titles (the seed row of its header) and its rows: (title, [thumbnail links])."""
    header = table.one("thead").all("tr")
    rows = [(tr.one("th", scope="row").text, tr.all("a")) for tr in table.one("tbody").all("tr")]
    return [th.text for th in header[0].all("th")], [th.text for th in header[1].all("th")], rows


def test_the_report_reads_as_a_page(evaluated):
    """Title, the scores with the best starred and no empty column, the real photos, base beside final and every
    checkpoint as labelled rows of thumbnails, each linking to the image on disk."""
    tmp_path, _, results = evaluated
    folder = tmp_path / "out" / "evaluation"
    saved = json.load(open(folder / "metrics.json"))
    page = parse_page(folder / "report.html")
    assert page.one("title").text == page.one("h1").text == "out"  # the run: its output folder's name

    # The scores: a column per computed score (no toy scorer here: no such column), the best of each starred.
    scores_table = page.one("table", class_="scores")
    assert all("toy_subject" not in r for r in saved["results"])
    assert [th.text for th in scores_table.all("th")] == ["name", "step", "CLIP-T", "CLIP-I", "DINO", "eval loss"]
    for metric in ("clip_t", "clip_i", "dino", "eval_loss"):
        pick = min if metric == "eval_loss" else max
        best = pick(saved["results"], key=lambda r: r[metric])
        [starred] = [tr for tr in scores_table.all("tr") if tr.all("td", class_="best", **{"data-metric": metric})]
        assert starred.attrs["data-name"] == best["name"]
        assert starred.one("td", class_="best", **{"data-metric": metric}).text == f"{best[metric]:.4f} \u2605"
    assert f"{results[2]['clip_t']:.4f}" in scores_table.text

    # The real photos first: one thumbnail per photo CLIP-I and DINO compared against, linking to it.
    subject = page.one("section", id="subject")
    photos = subject.all("a")
    assert len(photos) == saved["settings"]["real_images"] == len(os.listdir(tmp_path / "subject"))
    assert sorted(os.path.basename(urllib.parse.unquote(a.attrs["href"])) for a in photos) == sorted(
        os.listdir(tmp_path / "subject"))

    # Base beside final: a row per prompt, titled with it; a column per seed under each model.
    models, seeds, rows = image_rows(page.one("section", id="before-after").one("table"))
    assert models == ["prompt", "base (step 0)", "final (step 4)"] and seeds == ["seed 0", "seed 1"] * 2
    assert [title for title, _ in rows] == saved["prompts"]
    assert [a.attrs["href"] for a in rows[3][1]] == ["images/base/p03-seed0.png", "images/base/p03-seed1.png",
                                                     "images/final/p03-seed0.png", "images/final/p03-seed1.png"]
    # Then the checkpoints between, in step order.
    [section] = page.one("section", id="checkpoints").all("section")
    models, seeds, rows = image_rows(section.one("table"))
    assert section.attrs["id"] == "model-checkpoint-2" and models == ["prompt", "checkpoint-2 (step 2)"]
    assert seeds == ["seed 0", "seed 1"] and [title for title, _ in rows] == saved["prompts"]

    # Every link leads to a file that exists; every picture is a small embedded thumbnail, the plots whole PNGs.
    links = [urllib.parse.unquote(a.attrs["href"]) for a in page.all("a")]
    assert len(links) == 8 + 3 * 25 * 2 + 3 + 1 + 2  # photos, pictures, names to grids, whole grid, plots
    assert all(os.path.isfile(folder / href) for href in links), [h for h in links if not os.path.isfile(folder / h)]
    thumbs = page.all("img", class_="thumb")
    assert len(thumbs) == 8 + 3 * 25 * 2
    for img in thumbs:
        assert img.attrs["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
        assert min(int(img.attrs["width"]), int(img.attrs["height"])) >= 128 or img.attrs["alt"].startswith("real")
    drawn = [img for img in thumbs if not img.attrs["alt"].startswith("real")]
    assert {(img.attrs["width"], img.attrs["height"]) for img in drawn} == {("128", "128")}  # 64 px shown 2x
    assert len(page.all("img")) == len(thumbs) + 2  # and the two plots
    for img in thumbs:  # what is embedded is small: a 128 px JPEG of a real photo, a toy picture's own 64 px
        embedded = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1])))
        assert max(embedded.size) <= 128
    base = next(img for img in thumbs if img.attrs["alt"] == f"base: {saved['prompts'][3]}, seed 1")
    embedded = Image.open(io.BytesIO(base64.b64decode(base.attrs["src"].split(",", 1)[1])))
    assert embedded.tobytes() == Image.open(folder / "images" / "base" / "p03-seed1.png").convert("RGB").tobytes()
    assert "a ohwx toy wearing" not in open(folder / "report.html").read()  # the object prompts, not the live ones


def test_the_plots_have_titles_and_axis_names(tmp_path, monkeypatch):
    """The plots say what they show, and the best point of each score is starred."""
    import matplotlib.figure

    from common import report

    results = [{"name": "base", "step": 0, "clip_t": 0.3, "eval_loss": 0.2, "eval_loss_per_timestep": {1: 0.3, 9: 0.1}},
               {"name": "final", "step": 4, "clip_t": 0.25, "eval_loss": 0.1,
                "eval_loss_per_timestep": {1: 0.2, 9: 0.05}}]
    seen, savefig = {}, matplotlib.figure.Figure.savefig

    def keep(figure, path, **options):  # each figure, to read its titles and labels
        seen[os.path.basename(path)] = figure
        return savefig(figure, path, **options)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    paths = report.write_plots(results, str(tmp_path), "my-run")
    assert sorted(paths) == ["eval_loss_by_timestep", "scores"] and all(os.path.isfile(p) for p in paths.values())
    clip_t, loss = seen["scores.png"].axes
    assert seen["scores.png"].get_suptitle() == "my-run: scores by training step (\u2605: the best)"
    assert clip_t.get_title() == "CLIP-T (higher is better)"
    assert clip_t.get_xlabel() == "training step (0: the base model)"
    assert clip_t.get_ylabel() == "cosine, picture vs its prompt"
    assert (loss.get_title(), loss.get_ylabel()) == ("eval loss (lower is better)", report.AXIS_NAMES["eval_loss"])
    assert [tuple(line.get_xydata()[0]) for line in (clip_t.lines[1], loss.lines[1])] == [(0, 0.3), (4, 0.1)]  # best
    [by_timestep] = seen["eval_loss_by_timestep.png"].axes
    assert by_timestep.get_title() == "my-run: eval loss at each fixed timestep"
    assert by_timestep.get_xlabel() == "timestep (0: clean, 999: pure noise)"
    assert by_timestep.get_ylabel() == report.AXIS_NAMES["eval_loss"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_report_shows_every_image_in_headless_chromium(evaluated, tmp_path):
    """A browser opens the page: every thumbnail and plot decodes, the toy pictures are drawn at 128 px (enlarged
    2x), and the title and the starred best show."""
    folder = evaluated[0] / "out" / "evaluation"
    source = folder / "report-probe.html"  # beside the report, so the relative links resolve as they do for it
    probe = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-images', JSON.stringify("
             "[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0 && i.naturalHeight > 0, "
             "i.naturalWidth, i.getBoundingClientRect().width]))))</script>")
    page = (folder / "report.html").read_text(encoding="utf-8")
    source.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    try:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                              "--dump-dom", source.as_uri()], capture_output=True, text=True, timeout=120).stdout
    finally:
        source.unlink()
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, dom[-2000:]
    shown = json.loads(html.unescape(found.group(1)))
    assert len(shown) == 8 + 3 * 25 * 2 + 2 and all(loaded for _, loaded, _, _ in shown), shown
    drawn = [(natural, width) for alt, _, natural, width in shown if alt.startswith(("base", "checkpoint", "final"))]
    assert len(drawn) == 3 * 25 * 2 and set(drawn) == {(64, 128)}
    assert "<title>out</title>" in dom and "checkpoint-2 (step 2)" in dom and "\u2605" in dom


def test_bad_requests_are_refused_with_the_fix(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    with pytest.raises(SystemExit, match="no such folder"):
        evaluate.main(eval_argv(model, subject_dir, tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no checkpoint-N folder and no trained output"):
        evaluate.main(eval_argv(model, subject_dir, tmp_path / "empty"))
    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--max_train_steps", "1"))
    with pytest.raises(SystemExit, match="--only checkpoint-9: not found"):
        evaluate.main(eval_argv(model, subject_dir, tmp_path / "out", "--only", "checkpoint-9"))
    with pytest.raises(SystemExit, match="pass --class_prompt"):
        argv = eval_argv(model, subject_dir, tmp_path / "out", "--validation_prompt", "a {class}")
        argv.remove("--class_prompt")
        argv.remove("toy")
        evaluate.main(argv)


def test_training_scores_validation_images_with_clip(tiny_model, tiny_scorers, subject_dir, tmp_path):
    clip, _ = tiny_scorers
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--max_train_steps", "2",
                                     "--validation_prompt", "a {instance} on the beach", "--validation_instance",
                                     "ohwx toy", "--validation_class", "toy", "--validation_steps", "2",
                                     "--num_validation_images", "2", "--validation_num_inference_steps", "2",
                                     "--evaluation_type", "clip", "--clip_model", clip))
    [logged] = [r for r in log_records(tmp_path / "out") if "validation/clip_t" in r]
    folder = tmp_path / "out" / "validation" / "step-2"
    drawn = [Image.open(folder / f"prompt00-seed{s}.png") for s in (0, 1)]
    scorer = scores.Scorer(clip)
    subject = [images.load_image(os.path.join(subject_dir, n)) for n in sorted(os.listdir(subject_dir))]
    expected = scorer.scores(drawn, ["a toy on the beach"] * 2, scorer.clip_images(subject))
    assert logged["step"] == 2
    assert logged["validation/clip_t"] == pytest.approx(expected["clip_t"], abs=1e-5)
    assert logged["validation/clip_i"] == pytest.approx(expected["clip_i"], abs=1e-5)


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_each_model_is_applied_and_removed_without_a_trace(tiny_model, subject_dir, tmp_path, adapter):
    from conftest import model_info, predict, unet_inputs

    model = tiny_model("sd1")
    extra = []
    if adapter == "lokr":
        config = tmp_path / "lokr.json"
        config.write_text('{"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4}')
        extra = ["--lora_type", "lycoris", "--lycoris_config", config]
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--learning_rate", "1e-2", *extra))
    info = model_info(model)
    pipe = models.load_pipeline(info)
    inputs = unet_inputs(pipe.unet, "sd1")
    before = predict(pipe.unet, inputs)
    [*_, final] = evaluate.find_targets(str(tmp_path / "out"), None, "raw")
    assert final[:3] == ("final", 4, "adapter")
    with evaluate.weights_of(pipe, final, info):
        assert torch.allclose(predict(pipe.unet, inputs), predict(result["unet"], inputs), atol=1e-5)
    assert torch.equal(predict(pipe.unet, inputs), before) and not hasattr(pipe.unet, "lycoris")


def test_bf16_runs_evaluate_to_their_logged_eval_loss(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(model, subject_dir, out, "--mixed_precision", "bf16", "--max_train_steps", "2",
                                     "--checkpointing_steps", "1", "--eval_split", "2", "--eval_steps_interval", "1",
                                     prompt="ohwx toy"))
    logged = {r["step"]: r["eval_loss"] for r in log_records(out) if "eval_loss" in r}
    results = evaluate.main(eval_argv(model, subject_dir, out, "--mixed_precision", "bf16", "--clip_model", "none",
                                      "--num_images_per_prompt", "1"))
    assert {r["step"]: r["eval_loss"] for r in results} == logged
    fp32 = evaluate.main(eval_argv(model, subject_dir, out, "--clip_model", "none", "--num_images_per_prompt", "1",
                                   "--evaluation_dir", tmp_path / "fp32"))
    assert fp32[-1]["eval_loss"] != logged[2]  # the precision matters, hence the flag


def test_old_or_partial_checkpoints_are_skipped_and_the_instance_is_required(tiny_model, subject_dir, tmp_path,
                                                                            capsys):
    model = tiny_model("sd1")
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(model, subject_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    os.remove(out / "checkpoint-1" / adapters.LORA_WEIGHTS_NAME)  # as an older version wrote them
    names = [t[0] for t in evaluate.find_targets(str(out), None, "raw")]
    assert names == ["base", "final"] and "skipped" in capsys.readouterr().out
    argv = eval_argv(model, subject_dir, out, "--clip_model", "none")
    argv[argv.index("--instance_prompt"):argv.index("--instance_prompt") + 2] = []
    with pytest.raises(SystemExit, match="--instance_prompt .* is needed"):
        evaluate.main(argv)


def test_the_vae_decodes_outside_autocast_in_its_own_precision(tiny_model):
    """Validation and evaluate.py draw under autocast (fp16 on GPUs; bf16 stands in on CPU). The SDXL denoiser runs
    under it; the VAE, held in fp32, decodes outside it in fp32 (under fp16 autocast SDXL's VAE overflows), and the
    picture equals the one an fp32 decode of the same latents gives."""
    info = model_info(tiny_model("sdxl"))
    pipe = models.load_pipeline(info)
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = (torch.is_autocast_enabled("cpu"), inputs[0].dtype)
        return hook

    pipe.unet.register_forward_pre_hook(record("unet"))
    pipe.vae.decoder.conv_in.register_forward_pre_hook(record("vae"))
    options = render.drawing_options(info, 2, 1.0, None, 64)
    [[image]] = render.render(pipe, ["a photo of ohwx toy"],
                              render.Round(1, 0, options, lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    assert seen["unet"][0] is True  # the denoiser under autocast
    assert seen["vae"] == (False, torch.float32)  # the decode outside it, in the VAE's fp32
    assert "decode" not in vars(pipe.vae)  # the pipeline's VAE is its own again
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), render.predicting_in_fp32(pipe):
        latents = pipe(prompt="a photo of ohwx toy", generator=torch.Generator().manual_seed(0), output_type="latent",
                       **options).images  # the latents as render.render steps them
    with torch.no_grad():
        decoded = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).float()).sample  # unscaled as drawn
    expected = pipe.image_processor.postprocess(decoded)[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_evaluate_reads_a_training_configs_validation_settings_and_its_own_flags_win(tmp_path):
    """A training config's validation settings are evaluate.py's drawing settings; {instance} and {class} are its
    validation_instance and validation_class (not the instance caption, nor the class images' caption), unless
    evaluate.py's own flags are on the command line."""
    from conftest import write_json

    config = write_json(tmp_path / "config.json", {
        "instance_prompt": "a photo of ohwx toy", "with_prior_preservation": True, "class_prompt": "a photo of a toy",
        "validation_instance": "ohwx toy", "validation_class": "toy", "num_validation_images": 3,
        "validation_seed": 5, "validation_num_inference_steps": 7, "validation_guidance_scale": 3.0,
        "validation_resolution": 48, "validation_negative_prompt": "blurry", "learning_rate": 0.1})

    def drawing(args):
        return (args.validation_instance, args.validation_class, args.num_images_per_prompt, args.validation_seed,
                args.num_inference_steps, args.guidance_scale, args.image_resolution, args.negative_prompt)

    assert drawing(evaluate.parse_args(["--config", config])) == ("ohwx toy", "toy", 3, 5, 7, 3.0, [(48, 48)], "blurry")
    overridden = evaluate.parse_args(["--config", config, "--instance_prompt", "sks toy", "--class_prompt", "figure",
                                      "--num_images_per_prompt", "1", "--guidance_scale", "1.5"])
    assert drawing(overridden) == ("sks toy", "figure", 1, 5, 7, 1.5, [(48, 48)], "blurry")
    unset = write_json(tmp_path / "unset.json", {"instance_prompt": "ohwx toy", "class_prompt": "a photo of a toy"})
    assert drawing(evaluate.parse_args(["--config", unset]))[:2] == ("ohwx toy", None)  # evaluate.py's defaults
    assert drawing(evaluate.parse_args(["--config", unset]))[2:] == (4, 0, 25, None, None, None)


@pytest.mark.parametrize("family,precision", [("sd1", "no"), ("sd1", "bf16"), ("if", "no")])
def test_evaluate_with_the_training_config_draws_the_validation_images_pixel_for_pixel(tiny_model, subject_dir,
                                                                                        tmp_path, family, precision):
    """Given only the training config, evaluate.py draws each checkpoint as training's validation drew it at that
    step: the same prompts ({instance} is validation_instance, not the caption), seeds, steps, guidance, negative
    prompt and resolution (none of them the defaults), the same pixels. In bf16 too: there training's model predicts
    in fp32 (accelerate's wrapper), and so must evaluate.py's (render.predicting_in_fp32)."""
    from conftest import write_json

    out = tmp_path / "out"
    config = write_json(tmp_path / "config.json", {
        "pretrained_model_name_or_path": tiny_model(family), "instance_data_dir": subject_dir,
        "instance_prompt": "a photo of ohwx toy", "output_dir": str(out), "resolution": 32 if family == "if" else 64,
        "seed": 7,
        "train_batch_size": 2, "max_train_steps": 4, "learning_rate": 1e-2, "lora_rank": 4, "checkpointing_steps": 2,
        "validation_prompt": ["{instance} on the beach", "a {class} in the snow"], "validation_instance": "ohwx toy",
        "validation_class": "toy", "validation_steps": 2, "num_validation_images": 2, "validation_seed": 5,
        "validation_num_inference_steps": 3, "validation_guidance_scale": 3.0, "validation_resolution": 48,
        "validation_negative_prompt": "blurry", "mixed_precision": precision})
    train_dreambooth.main(["--config", config])
    results = evaluate.main(["--config", config, "--clip_model", "none"])  # (the scores' models are not local)

    assert [(r["name"], r["step"]) for r in results] == [("base", 0), ("checkpoint-2", 2), ("final", 4)]
    saved = json.load(open(out / "evaluation" / "metrics.json"))
    assert saved["prompts"] == ["ohwx toy on the beach", "a toy in the snow"]
    pictures = {}
    for name, step in (("checkpoint-2", 2), ("final", 4)):
        validation = out / "validation" / f"step-{step}"
        assert (validation / "prompts.txt").read_text().splitlines() == saved["prompts"]
        assert sorted(os.listdir(out / "evaluation" / "images" / name)) == [
            f"p{p:02d}-seed{seed}.png" for p in (0, 1) for seed in (5, 6)]
        for p in (0, 1):
            for seed in (5, 6):
                ours = np.asarray(Image.open(out / "evaluation" / "images" / name / f"p{p:02d}-seed{seed}.png"))
                theirs = np.asarray(Image.open(validation / f"prompt{p:02d}-seed{seed}.png"))
                assert ours.shape == theirs.shape == (48, 48, 3)
                assert np.array_equal(ours, theirs), (name, p, seed)
                pictures[name, p, seed] = ours
    # Not one picture drawn four times: the steps, prompts and seeds each change it.
    assert len({picture.tobytes() for picture in pictures.values()}) == 8


def test_dino_scores_without_clip(tiny_model, tiny_scorers, subject_dir, tmp_path):
    """--clip_model none --dino_model DINO: DINO alone (no CLIP model is loaded: the default one is not local), equal
    to the mean pairwise cosine of the ViT's CLS tokens over the saved pictures and the real subject images."""
    from transformers import ViTImageProcessorPil, ViTModel

    _, dino = tiny_scorers
    model = tiny_model("sd1")
    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--max_train_steps", "1"))
    results = evaluate.main(eval_argv(model, subject_dir, tmp_path / "out", "--clip_model", "none", "--dino_model",
                                      dino, "--eval_split", "0", "--only", "final"))
    vit, processor = ViTModel.from_pretrained(dino).eval(), ViTImageProcessorPil.from_pretrained(dino)

    def cls(batch):
        with torch.no_grad():
            token = vit(**processor(images=batch, return_tensors="pt")).last_hidden_state[:, 0]
        return token / token.norm(dim=-1, keepdim=True)

    real = [images.load_image(os.path.join(subject_dir, n)) for n in sorted(os.listdir(subject_dir))]
    for r in results:
        folder = tmp_path / "out" / "evaluation" / "images" / r["name"]
        drawn = [Image.open(folder / n).convert("RGB") for n in sorted(os.listdir(folder))]
        assert len(drawn) == 2 and "clip_t" not in r and "clip_i" not in r
        assert r["dino"] == pytest.approx((cls(drawn) @ cls(real).T).mean().item(), abs=1e-5)
