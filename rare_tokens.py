"""Choose the instance token: rare one-token identifiers that carry little prior, checked against the model's own
tokenizers and text encoders.

    python rare_tokens.py --pretrained_model_name_or_path MODEL --count 20       # ranked candidates
    python rare_tokens.py --pretrained_model_name_or_path MODEL --check sks ohwx  # what a word is to the model
    python rare_tokens.py --images subject/ --names names.txt                    # look-alike names by CLIP

Reads only the tokenizers and text encoders (no UNet or VAE is loaded).

How candidates are ranked. CLIP's byte-pair vocabulary lists its merges in the order they were learnt, most
frequent first, so a whole-word token's merge rank says how common the word was in CLIP's training text: the
first --common_words whole words are taken as the common words, and a candidate merged late is rare. Rarity in
text is not the whole story: a token whose input embedding lies close to common words' embeddings still pulls
the picture towards them (`sks` sits near weapon words). So each candidate gets two parts, each as a percentile
among the candidates (1.0 = the best), and the score is their mean:
    rank       its merge rank (later = rarer)
    distance   1 - mean cosine to its 5 nearest common words, averaged over the model's text encoders
A candidate is 3-5 lowercase letters, one token in every tokenizer of the model, and not a common word (nor in
--words FILE, e.g. a dictionary, one word per line).
"""

import argparse
import re

import torch

from common import data, flags, images, models, scores

BYTE_TOKENS = 512  # a CLIP vocabulary starts with 256 byte tokens and their 256 end-of-word forms, then the merges
NEAREST = 5


# ---------------------------------------------------------------------------------------------------------------------
# The vocabulary and the embeddings


def whole_words(tokenizer):
    """{word: merge rank} for every merged token that is a whole lowercase word ("dog</w>" -> "dog")."""
    words = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token.endswith("</w>") and token_id >= BYTE_TOKENS and re.fullmatch(r"[a-z]+", token[:-4]):
            words[token[:-4]] = token_id - BYTE_TOKENS
    return words


def tokens_of(tokenizer, word):
    return tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)


def normalised_embeddings(encoder, tokenizer, words):
    """The text encoder's input embedding of each word (the mean over its tokens), L2-normalised."""
    table = encoder.get_input_embeddings().weight.detach().float()
    rows = [table[tokenizer(w, add_special_tokens=False).input_ids].mean(0) for w in words]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


class Vocabulary:
    """The model's tokenizers and text encoders, with its common words and their embeddings."""

    def __init__(self, args):
        self.info = models.resolve_model(args)
        self.tokenizers, self.encoders = models.load_text_encoders(self.info)
        ranked = whole_words(self.tokenizers[0])
        if not ranked:
            raise SystemExit(f"{args.pretrained_model_name_or_path}: its tokenizer has no CLIP-style byte-pair "
                             "vocabulary (no 'word</w>' tokens); rare_tokens.py reads CLIP tokenizers")
        self.ranks = ranked
        self.total = max(ranked.values()) + 1
        self.common = [w for w, _ in sorted(ranked.items(), key=lambda item: item[1])[:args.common_words]]
        self.common_set = set(self.common)
        self.common_embeddings = [normalised_embeddings(e, t, self.common) for t, e in zip(self.tokenizers,
                                                                                             self.encoders)]

    def nearest(self, words):
        """(mean cosine to the NEAREST closest common words, averaged over encoders; those words, from encoder 1)."""
        similarity, names = 0.0, None
        for (tokenizer, encoder), common_embeddings in zip(zip(self.tokenizers, self.encoders), self.common_embeddings):
            cosines = normalised_embeddings(encoder, tokenizer, words) @ common_embeddings.T
            for i, word in enumerate(words):  # a word is not its own neighbour
                if word in self.common_set:
                    cosines[i, self.common.index(word)] = -2
            top = cosines.topk(NEAREST, dim=1)
            similarity = similarity + top.values.mean(1) / len(self.encoders)
            if names is None:
                names = [[(self.common[j], cosines[i, j].item()) for j in top.indices[i].tolist()]
                         for i in range(len(words))]
        return similarity, names


def percentile(values):
    """Each value's rank among all, scaled to [0, 1] (1 = the largest)."""
    order = values.argsort().argsort().float()
    return order / max(1, len(values) - 1)


def candidates(vocabulary, excluded, count):
    """The `count` best identifiers: [(word, score, rank, rank part, distance, distance part, neighbours)]."""
    words = [w for w, rank in vocabulary.ranks.items()
             if 3 <= len(w) <= 5 and w not in vocabulary.common_set and w not in excluded
             and all(len(tokens_of(t, w)) == 1 for t in vocabulary.tokenizers)]
    if not words:
        raise SystemExit("no candidate left: lower --common_words or use a shorter --words list")
    similarity, neighbours = vocabulary.nearest(words)
    ranks = torch.tensor([vocabulary.ranks[w] for w in words], dtype=torch.float32)
    distance = 1 - similarity
    rank_part, distance_part = percentile(ranks), percentile(distance)
    score = (rank_part + distance_part) / 2
    order = score.argsort(descending=True)[:count].tolist()
    return [(words[i], score[i].item(), int(ranks[i]), rank_part[i].item(), distance[i].item(),
             distance_part[i].item(), neighbours[i]) for i in order]


# ---------------------------------------------------------------------------------------------------------------------
# The three jobs


def list_candidates(vocabulary, args):
    excluded = set()
    if args.words:
        with open(args.words, encoding="utf-8") as handle:
            excluded = {line.strip().lower() for line in handle if line.strip()}
    found = candidates(vocabulary, excluded, args.count)
    print(f"{len(vocabulary.common)} most frequent whole words are the common words; score = mean of the rank and "
          f"distance percentiles (1.0 = rarest / farthest)\n")
    print(f"{'':>3} {'token':<7}{'score':>7}{'merge rank':>12}{'rank part':>11}{'distance':>10}{'dist part':>11}"
          f"   nearest common words")
    for i, (word, score, rank, rank_part, distance, distance_part, near) in enumerate(found, 1):
        print(f"{i:>3} {word:<7}{score:>7.3f}{rank:>12}{rank_part:>11.3f}{distance:>10.3f}{distance_part:>11.3f}"
              f"   {', '.join(w for w, _ in near)}")
    return found


def check_words(vocabulary, words):
    report = []
    similarity, neighbours = vocabulary.nearest([w.lower() for w in words])
    for i, word in enumerate(words):
        pieces = [tokens_of(t, word.lower()) for t in vocabulary.tokenizers]
        rank = vocabulary.ranks.get(word.lower())
        print(f"{word}:")
        for (name, _), tokens in zip(vocabulary.info.text_parts, pieces):
            print(f"  {name}: {len(tokens)} token{'s' if len(tokens) != 1 else ''} {tokens}")
        if rank is not None:
            common = " (a common word)" if word.lower() in vocabulary.common_set else ""
            print(f"  merge rank {rank} of {vocabulary.total}{common}")
        print(f"  nearest common words: {', '.join(f'{w} ({c:.2f})' for w, c in neighbours[i])}"
              f"  mean cosine {similarity[i].item():.3f}")
        report.append({"word": word, "tokens": pieces, "rank": rank, "similarity": similarity[i].item(),
                       "nearest": neighbours[i]})
    return report


def rank_names(args):
    """Names (e.g. look-alike celebrities) by CLIP similarity of "a photo of NAME" to the subject's images."""
    with open(args.names, encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    paths, problems = data.find_images(args.images)
    if not names or not paths:
        raise SystemExit(f"--names {args.names} needs one name per line and --images {args.images} at least one image"
                         + (f" ({len(problems)} unreadable)" if problems else ""))
    scorer = scores.Scorer(args.clip_model, allow_pickle=args.allow_pickle)
    pictures = scorer.clip_images([images.load_image(p) for p in paths])
    texts = scorer.clip_texts([args.name_template.format(name=name) for name in names])
    similarity = (texts @ pictures.T).mean(1)
    ranked = sorted(zip(names, similarity.tolist()), key=lambda item: -item[1])
    print(f"{'':>3} {'name':<30}{'CLIP similarity':>16}   ({len(paths)} images, \"{args.name_template}\")")
    for i, (name, value) in enumerate(ranked, 1):
        print(f"{i:>3} {name:<30}{value:>16.4f}")
    return ranked


# ---------------------------------------------------------------------------------------------------------------------
# Flags and the run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.HelpFormatter)
    flags.add_model_args(parser)
    parser.add_argument("--output_dir", default="output", help="where a single-file checkpoint is converted")
    parser.add_argument("--cache_dir", default=None, help="for a converted single-file model (default: OUTPUT_DIR/cache)")
    parser.add_argument("--count", type=int, default=20, help="how many candidates to list")
    parser.add_argument("--common_words", type=int, default=10000,
                        help="the first N whole-word merges count as common words (default 10000)")
    parser.add_argument("--words", default=None, help="also exclude these words (one per line, e.g. a dictionary)")
    parser.add_argument("--check", nargs="+", default=None, metavar="WORD", help="report on these words instead")
    parser.add_argument("--images", default=None, help="subject images, for --names")
    parser.add_argument("--names", default=None, help="candidate names, one per line: ranked by CLIP similarity")
    parser.add_argument("--name_template", default="a photo of {name}",
                        help="the text each candidate is scored in ({name}: the candidate)")
    parser.add_argument("--clip_model", default="openai/clip-vit-base-patch32",
                        help="with --images --names: the CLIP model that finds the names the subject looks like")
    args = parser.parse_args(argv)
    if bool(args.images) != bool(args.names):
        parser.error("--images and --names go together")
    if not args.names and not args.pretrained_model_name_or_path:
        parser.error("--pretrained_model_name_or_path is needed (its tokenizers and text encoders are what counts)")
    if args.count < 1 or args.common_words < NEAREST:
        parser.error(f"--count must be 1 or more and --common_words at least {NEAREST}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.names:
        return rank_names(args)
    vocabulary = Vocabulary(args)
    if args.check:
        return check_words(vocabulary, args.check)
    return list_candidates(vocabulary, args)


if __name__ == "__main__":
    main()
