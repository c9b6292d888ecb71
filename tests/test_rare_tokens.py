"""rare_tokens.py on the real CLIP vocabulary (tests/data, MIT) with tiny random text encoders."""

import gzip
import json
import os

import pytest
import torch

import make_demo
import rare_tokens

DATA = os.path.join(os.path.dirname(__file__), "data", "bpe_simple_vocab_16e6.txt.gz")
# Common English words (3-5 letters): none of them may ever be offered as an identifier.
COMMON_ENGLISH = """the and for are but not you all any can had her was one our out day get has him his how man new
now old see two way who boy did its let put say she too use dog cat car sun red blue green photo house water
black white small large great world about after again could every first found great house large light might never
other place right small sound still their there these thing think three where which while would write year years
woman women child girl happy smile table chair horse bird fish tree plant apple bread music style color""".split()


def bytes_to_unicode():
    """CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """The real CLIP tokenizer, its vocab.json and merges.txt derived from the byte-pair file the CLIP package ships."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip-vocab")
    merges = gzip.open(DATA).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def clip_vocab_model(tmp_path_factory, clip_tokenizer):
    built = {}

    def get(family="sd1"):
        if family not in built:
            folder = str(tmp_path_factory.mktemp(f"clipvocab-{family}"))
            built[family] = make_demo.build_tiny_model(folder, family, tokenizer=clip_tokenizer)
        return built[family]

    return get


def test_the_derived_vocabulary_is_clips(clip_tokenizer):
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer("a photo of a dog", add_special_tokens=False).input_ids == [320, 1125, 539, 320, 1929]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_candidates_are_single_rare_tokens_ranked_by_score(clip_vocab_model, tmp_path, capsys, family):
    from transformers import CLIPTokenizer

    model = clip_vocab_model(family)
    found = rare_tokens.main(["--pretrained_model_name_or_path", model, "--count", "20", "--output_dir",
                              str(tmp_path)])
    assert len(found) == 20
    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=s)
                  for s in (["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"])]
    for word, score, rank, rank_part, distance, distance_part, near in found:
        assert 3 <= len(word) <= 5 and word.isalpha() and word.islower()
        assert all(len(t(word, add_special_tokens=False).input_ids) == 1 for t in tokenizers), word
        assert word not in COMMON_ENGLISH
        assert rank >= 10000  # merged after every common word
        assert score == pytest.approx((rank_part + distance_part) / 2) and len(near) == 5
    scores = [f[1] for f in found]
    assert scores == sorted(scores, reverse=True)
    printed = capsys.readouterr().out
    assert all(f" {word} " in printed for word, *_ in found)


def test_the_distance_part_is_the_embedding_distance_to_the_nearest_common_words(clip_vocab_model, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    model = clip_vocab_model("sd1")
    [(word, _, rank, _, distance, _, near)] = rare_tokens.main(["--pretrained_model_name_or_path", model, "--count",
                                                               "1", "--output_dir", str(tmp_path)])
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    table = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").get_input_embeddings().weight.detach()
    vocab = tokenizer.get_vocab()
    assert vocab[word + "</w>"] - 512 == rank
    # The common words: the first 10000 whole lowercase words in merge order.
    words = sorted((i, t[:-4]) for t, i in vocab.items() if t.endswith("</w>") and i >= 512 and t[:-4].isalpha()
                   and t[:-4].isascii() and t[:-4].islower())[:10000]
    common = torch.nn.functional.normalize(table[[i for i, _ in words]], dim=-1)
    mine = torch.nn.functional.normalize(table[vocab[word + "</w>"]], dim=-1)
    top = (common @ mine).topk(5)
    assert distance == pytest.approx(1 - top.values.mean().item(), abs=1e-5)
    assert [w for w, _ in near] == [words[i][1] for i in top.indices.tolist()]


def test_check_reports_tokens_and_neighbours(clip_vocab_model, tmp_path, capsys):
    report = rare_tokens.main(["--pretrained_model_name_or_path", clip_vocab_model("sdxl"), "--check", "sks", "zwx",
                               "dog", "--output_dir", str(tmp_path)])
    sks, zwx, dog = report
    assert sks["tokens"] == [["sks</w>"], ["sks</w>"]]  # one token in both SDXL tokenizers
    assert zwx["tokens"][0] == ["z", "wx</w>"] and zwx["rank"] is None
    assert len(sks["nearest"]) == 5 and dog["rank"] < 10000
    assert all(word != "dog" for word, _ in dog["nearest"])  # not its own neighbour
    out = capsys.readouterr().out
    assert "sks:\n  tokenizer: 1 token ['sks</w>']" in out and "tokenizer_2: 1 token" in out
    assert "zwx:\n  tokenizer: 2 tokens ['z', 'wx</w>']" in out and "(a common word)" in out


def test_names_are_ranked_by_clip_similarity_to_the_subject(tiny_scorers, subject_dir, tmp_path):
    from common import images, scores

    clip, _ = tiny_scorers
    names = tmp_path / "names.txt"
    names.write_text("toy\nohwx toy\na red toy\n\nblue dog\n")
    ranked = rare_tokens.main(["--images", subject_dir, "--names", str(names), "--clip_model", clip])
    scorer = scores.Scorer(clip)
    pictures = scorer.clip_images([images.load_image(os.path.join(subject_dir, n))
                                   for n in sorted(os.listdir(subject_dir))])
    for name, value in ranked:
        expected = (scorer.clip_texts([f"a photo of {name}"]) @ pictures.T).mean().item()
        assert value == pytest.approx(expected, abs=1e-5)
    assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True) and len(ranked) == 4
    with pytest.raises(SystemExit):
        rare_tokens.main(["--images", subject_dir])
