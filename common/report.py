"""evaluate.py's report.html: one offline page a person reads to judge a run, and the plots it shows.

From the top: the scores of every evaluated model (the best by each score marked), the plots, the subject's real
photos, the base model beside the final one for every prompt, then every checkpoint in step order, and the
settings. Pictures are small embedded thumbnails, each a link to the full image in the evaluation folder, so a
page of 25 prompts x 4 seeds x 10 checkpoints stays a few MB and opens at once; it still needs no server and no
network, and moves with its evaluation folder (the links are relative).
"""

import base64
import html
import io
import math
import os
import pathlib
import urllib.parse

from PIL import Image

from common import files, images

METRICS = ("clip_t", "clip_i", "dino", "toy_subject", "eval_loss")
LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", "toy_subject": "subject (toy)",
          "eval_loss": "eval loss"}
LOWER_IS_BETTER = {"eval_loss"}
AXIS_NAMES = {"clip_t": "cosine, picture vs its prompt", "clip_i": "cosine, picture vs real photos (CLIP)",
              "dino": "cosine, picture vs real photos (DINO)", "toy_subject": "subject fidelity (toy scorer)",
              "eval_loss": "mean squared error, held-out images"}
THUMB = 128  # pixels: the longer side of a picture on the page (a click opens the image itself)
BEST = "\u2605"  # the star beside the best value of each score


def image_path(folder, name, prompt_index, seed):
    """Where evaluate.py saves one model's picture of one prompt at one seed."""
    return os.path.join(folder, "images", name, f"p{prompt_index:02d}-seed{seed}.png")


def run_name(settings):
    """The run's name: its training output folder's (what --checkpoints points at)."""
    return os.path.basename(os.path.normpath(os.path.abspath(settings["checkpoints"])))


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def shown_metrics(results):
    """The scores some model has: a score nobody computed (no CLIP model, no toy scorer) gets no column or plot."""
    return [m for m in METRICS if any(r.get(m) is not None for r in results)]


def best_names(results, metric):
    """The models with the best value of `metric` (the highest; the lowest for a loss): ties are all best."""
    values = [r[metric] for r in results if r.get(metric) is not None]
    if not values:
        return set()
    best = min(values) if metric in LOWER_IS_BETTER else max(values)
    return {r["name"] for r in results if r.get(metric) == best}


def write_plots(results, folder, run=""):
    """plots/scores.png (each score against the training step, its best marked) and
    plots/eval_loss_by_timestep.png. Returns {name: path} of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = {}
    shown = shown_metrics(results)
    if shown:
        figure, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4), squeeze=False)
        for axis, metric in zip(axes[0], shown):
            points = [(r["step"], r[metric], r["name"]) for r in results
                      if r.get(metric) is not None and r["step"] is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            best = [p for p in points if p[2] in best_names(results, metric)]
            axis.plot([p[0] for p in best], [p[1] for p in best], linestyle="none", marker="*", markersize=14,
                      color="tab:orange")
            axis.set_title(f"{LABELS[metric]} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
            axis.set_xlabel("training step (0: the base model)")
            axis.set_ylabel(AXIS_NAMES[metric])
            axis.grid(alpha=0.3)
        figure.suptitle(f"{run}: scores by training step ({BEST}: the best)")
        figure.tight_layout()
        paths["scores"] = os.path.join(folder, "scores.png")
        figure.savefig(paths["scores"], dpi=100)
        plt.close(figure)
    with_loss = [r for r in results if r.get("eval_loss_per_timestep")]
    if with_loss:
        figure, axis = plt.subplots(figsize=(6.5, 3.8))
        for r in with_loss:
            curve = r["eval_loss_per_timestep"]
            axis.plot([float(t) for t in curve], list(curve.values()), marker=".", label=model_title(r))
        # DDPM models are noised at integer timesteps (0-999); flow-matching ones at noise levels in [0, 1].
        flow = all(float(t) <= 1 for r in with_loss for t in r["eval_loss_per_timestep"])
        axis.set_title(f"{run}: eval loss at each fixed {'noise level' if flow else 'timestep'}")
        axis.set_xlabel("noise level (0: clean, 1: pure noise)" if flow else "timestep (0: clean, 999: pure noise)")
        axis.set_ylabel(AXIS_NAMES["eval_loss"])
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        paths["eval_loss_by_timestep"] = os.path.join(folder, "eval_loss_by_timestep.png")
        figure.savefig(paths["eval_loss_by_timestep"], dpi=100)
        plt.close(figure)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the page


def embedded(path):
    """A PNG file as a data: URL, to embed it whole in a page."""
    with open(path, "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode()


def link(path, folder):
    """`path` as a link from a page in `folder`: relative, so the evaluation folder can move with its run (on
    Windows a file on another drive has no relative path: it gets an absolute file: URL)."""
    try:
        return urllib.parse.quote(pathlib.Path(os.path.relpath(path, folder)).as_posix())
    except ValueError:
        return pathlib.Path(path).resolve().as_uri()


def thumbnail(path, folder, alt):
    """A picture as the page shows it: a small embedded copy, linking to the file. A big picture is shrunk to a
    THUMB px JPEG (a few kB each, so a thousand of them still open at once); a small one (a toy model's 32-64 px) is
    embedded as it is and drawn enlarged by a whole factor, nearest-neighbour (the page's CSS), so its pixels stay
    sharp squares instead of a blur."""
    if not os.path.isfile(path):  # a picture removed since: the rest of the page is still worth having
        return f'<span class="missing">missing: {html.escape(link(path, folder))}</span>'
    image = images.load_image(path)
    buffer = io.BytesIO()
    if max(image.size) <= THUMB:
        factor = math.ceil(THUMB / max(image.size))
        image.save(buffer, "PNG")
        kind, (width, height) = "png", (image.width * factor, image.height * factor)
    else:
        image.thumbnail((THUMB, THUMB), Image.LANCZOS)
        image.save(buffer, "JPEG", quality=85)
        kind, (width, height) = "jpeg", image.size
    source = f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()
    return (f'<a href="{link(path, folder)}"><img class="thumb" src="{source}" width="{width}" height="{height}" '
            f'alt="{html.escape(alt)}" title="{html.escape(alt)}"></a>')


def model_title(result):
    return result["name"] if result["step"] is None else f"{result['name']} (step {result['step']})"


def scores_table(results, folder):
    """A row per model, a column per score some model has; the best value of each score starred. A model's name
    links to its whole grid."""
    shown = shown_metrics(results)
    best = {m: best_names(results, m) for m in shown}
    header = "".join(f"<th>{html.escape(LABELS.get(k, k))}</th>" for k in ("name", "step", *shown))
    rows = []
    for r in results:
        cells = [f'<td class="name"><a href="{link(r["grid_path"], folder)}">{html.escape(r["name"])}</a></td>',
                 f"<td>{'' if r['step'] is None else r['step']}</td>"]
        for m in shown:
            if r.get(m) is None:
                cells.append("<td></td>")
            elif r["name"] in best[m]:
                cells.append(f'<td class="best" data-metric="{m}" title="the best {LABELS[m]}">{r[m]:.4f} {BEST}</td>')
            else:
                cells.append(f'<td data-metric="{m}">{r[m]:.4f}</td>')
        rows.append(f'<tr data-name="{html.escape(r["name"])}">{"".join(cells)}</tr>')
    return f'<table class="scores"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def image_table(models, prompts, seeds, folder):
    """The pictures of `models` side by side: a row per prompt (its title at the left) and, under each model, a
    column per seed. The seeds are the same for every model, so a column compares like with like."""
    top = "".join(f'<th class="model" colspan="{len(seeds)}">{html.escape(model_title(r))}</th>' for r in models)
    edge = ' class="model"'  # on each model's first column: a gap before it
    second = "".join(f"<th{edge if i == 0 else ''}>seed {s}</th>" for _ in models for i, s in enumerate(seeds))
    rows = []
    for p, (prompt, _) in enumerate(prompts):
        cells = []
        for r in models:
            for i, seed in enumerate(seeds):
                alt = f"{r['name']}: {prompt}, seed {seed}"
                picture = thumbnail(image_path(folder, r["name"], p, seed), folder, alt)
                cells.append(f"<td{edge if i == 0 else ''}>{picture}</td>")
        rows.append(f'<tr><th scope="row">{html.escape(prompt)}</th>{"".join(cells)}</tr>')
    # In a narrow window the table scrolls sideways: its pictures keep their size rather than shrink.
    return (f'<div class="wide"><table class="images"><thead><tr><th rowspan="2">prompt</th>{top}</tr>'
            f'<tr>{second}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def subject_strip(real_paths, folder):
    """The real photos of the subject (what CLIP-I and DINO compare against), each under its file name."""
    figures = "".join(f'<figure>{thumbnail(path, folder, f"real photo {i + 1}: {os.path.basename(path)}")}'
                      f"<figcaption>{html.escape(os.path.basename(path))}</figcaption></figure>"
                      for i, path in enumerate(real_paths))
    return f'<div class="strip">{figures}</div>'


def drawn_seeds(folder, settings, name):
    """The seeds every model was drawn at (a refiner refines each subject image once, at the first seed only)."""
    first = settings["validation_seed"]
    return [s for s in range(first, first + settings["num_images_per_prompt"])
            if os.path.isfile(image_path(folder, name, 0, s))]


# ---------------------------------------------------------------------------------------------------------------------
# The page

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px} table.scores td{text-align:right} table.scores td.name{text-align:left}
td.best{font-weight:bold;background:#e6f4e6} img{max-width:100%}
figure{display:inline-block;vertical-align:top;margin:0 8px 8px 0}
figcaption{font-size:small;color:#555} div.wide{overflow-x:auto}
img.thumb{image-rendering:pixelated;display:block;max-width:none}
table.images td{padding:1px;border:none} table.images th{font-weight:normal;font-size:small}
table.images th[scope=row]{text-align:left;max-width:14em} table.images .model{border-left:12px solid white}
.missing{font-size:small;color:#a00}"""


def write_report(folder, settings, results, prompts, real_paths):
    """report.html in `folder` (the evaluation folder, which holds the pictures it links to) and the plots it shows.
    `results` are in step order: the base model first, the final one last. Returns the page's path."""
    run = run_name(settings)
    plots = write_plots(results, os.path.join(folder, "plots"), run)
    seeds = drawn_seeds(folder, settings, results[0]["name"])
    before, after, between = results[0], results[-1], results[1:-1]
    figures = "".join(f'<figure><a href="{link(p, folder)}"><img src="{embedded(p)}" alt="plot: {html.escape(k)}">'
                      f"</a></figure>" for k, p in plots.items())
    checkpoints = "".join(f'<section id="model-{html.escape(r["name"])}"><h3>{html.escape(model_title(r))} '
                          f'<small><a href="{link(r["grid_path"], folder)}">whole grid</a></small></h3>'
                          f"{image_table([r], prompts, seeds, folder)}</section>" for r in between)
    settings_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                            for k, v in settings.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(run)}</h1>
<p>Evaluation of {len(results)} models of {html.escape(str(settings.get("model")))}: {len(prompts)} prompts x
{len(seeds)} seeds each, the same seeds for every model. Click a picture for the image itself.</p>
<h2>Scores</h2><p>CLIP-T, CLIP-I and DINO are raw cosines (the DreamBooth paper's scale; higher is better), as is
the toy scorer's subject fidelity (centred features, toy models only); the eval loss is the stable eval loss
(lower is better). {BEST}: the best model by that score. A name opens that model's whole grid.</p>
{scores_table(results, folder)}
<h2>Plots</h2>{figures or "<p>(no scores to plot)</p>"}
<section id="subject"><h2>The subject: {len(real_paths)} real photos</h2>
<p>What CLIP-I and DINO compare every picture with.</p>{subject_strip(real_paths, folder)}</section>
<section id="before-after"><h2>Before and after: {html.escape(before["name"])} and {html.escape(after["name"])}</h2>
<p>Each row one prompt; on the left the model before training, on the right after.</p>
{image_table([before, after], prompts, seeds, folder)}</section>
<section id="checkpoints"><h2>Every checkpoint, in step order</h2>
{checkpoints or "<p>(no checkpoints between the base and the final model)</p>"}</section>
<h2>Settings</h2><table>{settings_rows}</table>
</body></html>
"""
    path = os.path.join(folder, "report.html")
    files.write_text_atomic(page, path)
    return path
